"""One launch of a training job for the chaos soak: its processes started, a planned fault
handed to one of them, every process waited for within bounded times, and what happened.

A launch with several processes runs them on 127.0.0.1 through main's --coordinator_address,
--num_processes and --process_id, with --peer_timeout_s (the runtime's heartbeat timeout). Once
one process has ended, the others get `survivor_bound_s` seconds to end too; a survivor still
running then is killed and reported as hung. A launch still running after `launch_timeout`
seconds is killed and reported as hung, and a process that trains on after its SIGTERM is killed
once the job is a few steps past the fault.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from psvae_jax import console, fault_points
from psvae_jax.tools.chaos_plan import Fault

POLL_S = 0.1


@dataclasses.dataclass
class Job:
  """How to start one process of the job: main's flags without the per-process ones."""
  config: str  # configs/<stage>.py[:preset]
  overrides: list[str]  # --config.key=value, in order
  workdir: str
  processes: int
  log_dir: str
  compilation_cache_dir: str = ""  # '' = none
  cwd: str = "."
  peer_timeout_s: int = 0  # several processes: main's --peer_timeout_s (0 = main's default)

  def command(self, process: int, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "psvae_jax.main", f"--config={self.config}",
           f"--workdir={self.workdir}", *self.overrides]
    if self.compilation_cache_dir:
      cmd.append(f"--compilation_cache_dir={self.compilation_cache_dir}")
    if self.processes > 1:
      cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={self.processes}",
              f"--process_id={process}"]
      if self.peer_timeout_s:
        cmd.append(f"--peer_timeout_s={self.peer_timeout_s}")
    return cmd


@dataclasses.dataclass
class ProcessEnd:
  """How one process of a launch ended: its exit status (negative: the signal that ended it),
  or None when the soak killed it after a timeout, and when (seconds after the launch began)."""
  process: int
  returncode: int | None
  seconds: float
  log: str

  def lines(self) -> list[str]:
    """The non-empty lines of the process's console log."""
    if not os.path.exists(self.log):
      return []
    with open(self.log, errors="replace") as f:
      return [line.rstrip() for line in f if line.strip()]

  def last_lines(self, n: int = 3) -> str:
    return " | ".join(self.lines()[-n:])


@dataclasses.dataclass
class Launch:
  """What one launch did. `delivered_s`: when the planned fault struck (seconds after the
  launch began), None when it did not; `timed_out`: the launch ran past its timeout;
  `ignored_sigterm_at`: the step the job had logged when the soak killed a process that went
  on training after its SIGTERM; `started`: per process, the step its loop started at (from its
  log file; None when it did not get that far)."""
  tag: str
  fault: Fault | None
  fault_step: int | None
  ends: list[ProcessEnd]
  wall_s: float
  delivered_s: float | None = None
  timed_out: bool = False
  ignored_sigterm_at: int | None = None
  started: list[int | None] = dataclasses.field(default_factory=list)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _kill_group(pid: int) -> None:
  """SIGKILL to the process group the soak started (the process and any children it left)."""
  try:
    os.killpg(pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def run(job: Job, tag: str, *, fault: Fault | None = None, fault_step: int | None = None,
        launch_timeout: float, survivor_bound_s: float, term_grace_steps: int = 4) -> Launch:
  """Starts every process of `job`, hands `fault` (striking at `fault_step`) to its process,
  and waits for all of them; kills what outlives the timeouts. A process that keeps training
  after its SIGTERM (the job logs a step more than `term_grace_steps` past the one it should
  have stopped at) is killed, as a preempted host would be."""
  os.makedirs(job.log_dir, exist_ok=True)
  offset = metrics_size(job.workdir)
  log_offsets = [_size(console.log_file_path(job.workdir, p)) for p in range(job.processes)]
  marker = os.path.join(job.log_dir, f"{tag}.fault")
  if os.path.exists(marker):
    os.remove(marker)
  port = _free_port() if job.processes > 1 else 0
  base_env = {k: v for k, v in os.environ.items()
              if k not in (fault_points.PLAN_ENV, fault_points.MARKER_ENV)}
  base_env["PYTHONUNBUFFERED"] = "1"
  procs, logs = [], []
  started = time.monotonic()
  started_wall = time.time()
  try:
    for process in range(job.processes):
      env = dict(base_env)
      if fault is not None and fault.process == process:
        env[fault_points.PLAN_ENV] = f"{fault.moment}:{fault_step}:{fault.signal}"
        env[fault_points.MARKER_ENV] = marker
      logs.append(os.path.join(job.log_dir, f"{tag}.process{process}.log"))
      with open(logs[-1], "w") as log:
        procs.append(subprocess.Popen(job.command(process, port), cwd=job.cwd, env=env,
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    ends: dict[int, ProcessEnd] = {}
    timed_out = False
    ignored_term = None
    while len(ends) < len(procs):
      if (ignored_term is None and fault is not None and fault.signal == "SIGTERM"
          and fault.process not in ends and os.path.exists(marker)):
        last = max(logged_steps(job.workdir, offset), default=0)
        if last > fault_step + 1 + term_grace_steps:
          ignored_term = last
          _kill_group(procs[fault.process].pid)
      now = time.monotonic() - started
      for process, proc in enumerate(procs):
        if process not in ends and proc.poll() is not None:
          ends[process] = ProcessEnd(process, proc.returncode, now, logs[process])
      if len(ends) == len(procs):
        break
      first_end = min((e.seconds for e in ends.values()), default=None)
      peer_late = first_end is not None and now > first_end + survivor_bound_s
      timed_out = now > launch_timeout
      if peer_late or timed_out:
        for process, proc in enumerate(procs):
          if process not in ends:
            _kill_group(proc.pid)
            proc.wait()
            ends[process] = ProcessEnd(process, None, time.monotonic() - started, logs[process])
        break
      time.sleep(POLL_S)
  finally:
    for proc in procs:  # the processes' children too (data workers a killed process left)
      _kill_group(proc.pid)
      if proc.poll() is None:
        proc.wait()
  delivered = None
  if os.path.exists(marker):
    with open(marker) as f:
      at = float(f.read().split("at=")[1].split()[0])
    delivered = max(at - started_wall, 0.0)
  return Launch(tag=tag, fault=fault, fault_step=fault_step,
                ends=[ends[p] for p in range(len(procs))], wall_s=time.monotonic() - started,
                delivered_s=delivered, timed_out=timed_out, ignored_sigterm_at=ignored_term,
                started=[started_step(job.workdir, p, log_offsets[p])
                         for p in range(job.processes)])


# --- what the job left on disk -------------------------------------------------------------

def complete_steps(workdir: str) -> list[int]:
  """The finalized checkpoint steps of a job (a step still being written has another name)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _size(path: str) -> int:
  return os.path.getsize(path) if os.path.exists(path) else 0


def metrics_size(workdir: str) -> int:
  return _size(os.path.join(workdir, "metrics.jsonl"))


# The loop's INFO line once it has restored or initialized its state (train.train).
_START_LINE = re.compile(r"\] start at step (\d+) \(")


def started_step(workdir: str, process: int, offset: int = 0) -> int | None:
  """The step the loop of `process` started at, from its log file after byte `offset` (the
  first start line there); None when there is none."""
  path = console.log_file_path(workdir, process)
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    f.seek(offset)
    found = _START_LINE.search(f.read().decode(errors="replace"))
  return int(found.group(1)) if found else None


def data_positions(workdir: str, step: int) -> list[str]:
  """The data-iterator position files of checkpoint `step` (one per process that saved)."""
  directory = os.path.join(workdir, "checkpoints", str(step), "data")
  if not os.path.isdir(directory):
    return []
  return sorted(name for name in os.listdir(directory) if name.endswith(".json"))


def logged_steps(workdir: str, offset: int = 0) -> list[int]:
  """The steps metrics.jsonl logged after byte `offset` (a line cut by a kill is ignored)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    f.seek(offset)
    lines = f.read().decode(errors="replace").splitlines()
  steps = []
  for line in lines:
    try:
      steps.append(int(json.loads(line)["step"]))
    except (ValueError, KeyError, TypeError):
      continue
  return steps
