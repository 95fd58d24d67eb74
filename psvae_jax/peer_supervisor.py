"""A multi-process run's launched process forks the training worker and reports a lost peer.

When one process of a multi-process job dies or stops answering, the distributed runtime notices
within `--peer_timeout_s` (its heartbeat timeout; at once when the coordinator's connection
closes) and aborts every other process from a native thread: SIGABRT after a page of C++ log,
which nothing inside the process can catch. So main forks before the runtime starts: the child
(the worker) trains; the parent passes the worker's console through, forwards SIGTERM and SIGINT
to it, and when the runtime aborts it prints one line

  error: lost contact with process 1 (no heartbeat for --peer_timeout_s=100 s); ...

and exits with EXIT_PEER_LOST. The runtime's own report goes to the process's log file. Any other
end of the worker is passed on: its exit status, or 128 + the signal that killed it. Killing the
parent kills the worker too (Linux PR_SET_PDEATHSIG), so a SIGKILL of the launched process takes
its worker down like a host failure would.
"""
from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import sys
import time

EXIT_PEER_LOST = 75  # sysexits' EX_TEMPFAIL: restart to resume
# The runtime's abort line (xla/pjrt/distributed/client.h) and the records that lead up to it.
FATAL_MARKER = b"Terminating process because the JAX distributed service detected fatal errors"
_NATIVE_RECORD = re.compile(rb"^[IWEF]\d{4} [\d:.]+\s+\d+ (\S+):\d+\] ")
_RUNTIME_SOURCE = re.compile(rb"^(coordination_service\w*|client|preemption\w*)\.(cc|h)$")
# How long a runtime record is held back from the console waiting for the abort that usually
# follows it within milliseconds; without one it is shown after all.
_HOLD_S = 2.0
# The worker's first line on the pipe names its log file (consumed by the parent).
_LOG_FILE_TAG = b"\x00psvae-log-file "
_PR_SET_PDEATHSIG = 1

_supervised = False
_launched_pid: int | None = None  # in a worker: the process that was launched (its parent)


def supervise(*, workdir: str, peer_timeout_s: int) -> int | None:
  """Forks. In the child (the worker) returns None at once; in the parent waits for the worker
  and returns the exit status for the launched process."""
  global _supervised, _launched_pid
  parent = os.getpid()
  read_fd, write_fd = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(read_fd)
    _become_worker(parent, write_fd)
    _supervised, _launched_pid = True, parent
    return None
  os.close(write_fd)
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda s, _: _forward(pid, s))
  console = _ConsoleFilter()
  with os.fdopen(read_fd, "rb", buffering=0) as pipe:
    console.pump(pipe)
  status = _wait(pid)
  if not console.aborted:
    return status
  log_file = console.log_file or os.path.join(workdir, "log.txt")
  _append(log_file, console.report)
  print(lost_peer_message(console.report.decode(errors="replace"), workdir=workdir,
                          peer_timeout_s=peer_timeout_s, log_file=log_file),
        file=sys.stderr, flush=True)
  return EXIT_PEER_LOST


def launched_pid() -> int:
  """The process the launcher started and signals: in a worker its supervising parent (which
  forwards SIGTERM and SIGINT, and whose death kills the worker), otherwise this process."""
  return _launched_pid if _launched_pid is not None else os.getpid()


def announce_log_file(path: str) -> None:
  """Worker side: tells the parent where this process logs (the runtime's report goes there)."""
  if _supervised:
    os.write(2, _LOG_FILE_TAG + path.encode() + b"\n")


def await_runtime_verdict(peer_timeout_s: int) -> None:
  """Worker side, after a runtime error in a collective: a lost peer shows up first as such an
  error, and the runtime aborts this process within the heartbeat timeout. Waits that long so
  the parent reports the lost peer; returns when no abort came (the error is the worker's own)."""
  if _supervised:
    time.sleep(2 * peer_timeout_s + 5)


def lost_peer_message(report: str, *, workdir: str, peer_timeout_s: int, log_file: str) -> str:
  """The one line for the runtime's abort `report` (its log records, as text)."""
  unhealthy = re.search(r"unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+)", report)
  if unhealthy:
    ids = [int(i) for i in re.findall(r"\d+", unhealthy.group(1))]
    who = ("process " if len(ids) == 1 else "processes ") + ", ".join(map(str, ids))
    how = f"no heartbeat for --peer_timeout_s={peer_timeout_s} s"
  elif "CoordinationService/" in report:  # an RPC to the coordination service failed
    who = "process 0, the coordinator"
    how = ("no reply within" if "DEADLINE_EXCEEDED" in report else "connection closed;") + \
        f" --peer_timeout_s={peer_timeout_s} s"
  else:
    status = re.search(r"absl::Status: ([^\n]*)", report)
    who = "another process"
    how = (status.group(1)[:200] if status else "the runtime stopped") + \
        f"; --peer_timeout_s={peer_timeout_s} s"
  return (f"error: lost contact with {who} ({how}); this process stopped. Restart all processes "
          f"to resume from the last checkpoint in {workdir} (the runtime's report is in "
          f"{log_file})")


# --- worker side ---------------------------------------------------------------------------

def _become_worker(parent: int, write_fd: int) -> None:
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except (OSError, AttributeError):  # not Linux: the worker outlives a killed parent
    pass
  if os.getppid() != parent:  # the parent died before the line above
    os._exit(128 + signal.SIGKILL)
  # Its own process group: a terminal's Ctrl-C reaches the parent only, which forwards it once.
  os.setpgid(0, 0)
  os.dup2(write_fd, 2)
  os.close(write_fd)


# --- parent side ---------------------------------------------------------------------------

def _forward(pid: int, signum: int) -> None:
  try:
    os.kill(pid, signum)
  except ProcessLookupError:
    pass


def _wait(pid: int) -> int:
  while True:
    try:
      _, status = os.waitpid(pid, 0)
      break
    except ChildProcessError:
      return 1
    except InterruptedError:
      continue
  if os.WIFSIGNALED(status):
    return 128 + os.WTERMSIG(status)
  return os.WEXITSTATUS(status)


def _append(path: str, text: bytes) -> None:
  try:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "ab") as f:
      f.write(b"--- the distributed runtime's report (native log) ---\n" + text)
  except OSError as e:
    print(f"warning: could not write the runtime's report to {path}: {e}", file=sys.stderr)


class _ConsoleFilter:
  """Passes the worker's stderr through line by line, except the runtime's abort: its records
  (and everything after the abort line) are collected in `report` instead."""

  def __init__(self):
    self.aborted = False
    self.report = b""
    self.log_file: str | None = None
    self._held: list[bytes] = []
    self._held_since = 0.0

  def pump(self, pipe) -> None:
    pending = b""
    while True:
      ready, _, _ = select.select([pipe], [], [], 0.5)
      if ready:
        chunk = pipe.read(65536)
        if not chunk:
          break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
          self._line(line + b"\n")
      if self._held and time.monotonic() - self._held_since > _HOLD_S:
        self._show(b"".join(self._held))
        self._held = []
    if pending:
      self._line(pending)
    self._show(b"".join(self._held))

  def _line(self, line: bytes) -> None:
    if self.aborted:
      self.report += line
    elif line.startswith(_LOG_FILE_TAG):
      self.log_file = line[len(_LOG_FILE_TAG):].strip().decode()
    elif FATAL_MARKER in line:
      self.aborted = True
      self.report, self._held = b"".join(self._held) + line, []
    elif self._held or self._is_runtime_record(line):
      if not self._held:
        self._held_since = time.monotonic()
      self._held.append(line)
    else:
      self._show(line)

  @staticmethod
  def _is_runtime_record(line: bytes) -> bool:
    record = _NATIVE_RECORD.match(line)
    return bool(record and _RUNTIME_SOURCE.match(os.path.basename(record.group(1))))

  @staticmethod
  def _show(text: bytes) -> None:
    if text:
      sys.stderr.buffer.write(text)
      sys.stderr.flush()
