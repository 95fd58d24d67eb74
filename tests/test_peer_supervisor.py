"""The launched process of a multi-process run forks its worker (peer_supervisor): a runtime abort
becomes one line and exit 75, other ends pass through, signals are forwarded, and killing the
launched process kills the worker. The worker here is a few lines of Python, not a training run:
the runtime's abort is replayed from the records jax 0.10.2 writes."""
import os
import signal
import subprocess
import sys
import time

import pytest

from psvae_jax import peer_supervisor
from psvae_jax.peer_supervisor import EXIT_PEER_LOST, lost_peer_message

# What the runtime writes before aborting process 0 when process 1 stopped sending heartbeats,
# and process 1 when process 0 (the coordinator) closed its connection.
COORDINATOR_SAW_PEER_DIE = (
    "E1206 19:58:30.411589    6153 coordination_service.cc:1549] [3617174081131852820] Use error "
    "polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are "
    "unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.\n"
    "E1206 19:58:30.412371    6164 coordination_service_agent.cc:289] Polled an error from "
    "coordination service (this can be an error from this or another task).\n"
    "F1206 19:58:30.412778    6164 client.h:80] Terminating process because the JAX distributed "
    "service detected fatal errors. absl::Status: UNAVAILABLE: The following tasks are unhealthy "
    "(stopped sending heartbeats):\n1\n*** Check failure stack trace: ***\n")
COORDINATOR_GONE = (
    "E1206 19:58:46.234799    7417 coordination_service_agent.cc:289] Polled an error from "
    "coordination service (this can be an error from this or another task).\n"
    "F1206 19:58:46.234807    7417 client.h:80] Terminating process because the JAX distributed "
    "service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination "
    "service.\nAdditional GRPC error information from remote target coordination_service while "
    "calling /xla.coordination.CoordinationService/PollForError:\n"
    ":UNKNOWN:Error received from peer  {grpc_message:\"Socket closed\", grpc_status:14}\n")

# Runs `supervise`; the worker prints a line, then does what argv[2] says.
# The module is loaded from its file: importing the package would import jax (seconds).
_SCRIPT = r'''
import importlib.util, os, signal, sys, time
spec = importlib.util.spec_from_file_location("peer_supervisor", sys.argv[3])
peer_supervisor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer_supervisor)
workdir, action = sys.argv[1], sys.argv[2]
status = peer_supervisor.supervise(workdir=workdir, peer_timeout_s=7)
if status is not None:
  sys.exit(status)
peer_supervisor.announce_log_file(os.path.join(workdir, "log.process1.txt"))
print("worker: training", file=sys.stderr, flush=True)
if action == "abort":
  sys.stderr.write(os.environ["REPORT"])
  sys.stderr.flush()
  os.abort()
elif action == "exit":
  sys.exit(3)
else:  # wait for a signal
  open(os.path.join(workdir, "worker.pid"), "w").write(str(os.getpid()))
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  time.sleep(120)
'''


def _start(tmp_path, action, report=""):
  env = {**os.environ, "REPORT": report}
  return subprocess.Popen([sys.executable, "-c", _SCRIPT, str(tmp_path), action,
                           peer_supervisor.__file__], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _worker_pid(tmp_path) -> int:
  path = tmp_path / "worker.pid"
  deadline = time.monotonic() + 60
  while not path.exists() or not path.read_text():
    assert time.monotonic() < deadline, "the worker did not start"
    time.sleep(0.05)
  return int(path.read_text())


@pytest.mark.reliability(fault="the distributed runtime aborts the worker: {peer}",
                         expected="one line naming the lost process, exit 75; the runtime's "
                         "report in the log file")
@pytest.mark.parametrize("peer,report,lost", [
    ("process 1 sent no heartbeat", COORDINATOR_SAW_PEER_DIE, "process 1 (no heartbeat"),
    ("process 0 closed its connection", COORDINATOR_GONE, "process 0, the coordinator")])
def test_runtime_abort_becomes_one_line(tmp_path, peer, report, lost):
  proc = _start(tmp_path, "abort", report)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == EXIT_PEER_LOST, err
  lines = err.splitlines()
  assert lines[0] == "worker: training"
  assert len(lines) == 2 and lines[1].startswith(f"error: lost contact with {lost}"), err
  assert "--peer_timeout_s=7 s" in lines[1] and str(tmp_path) in lines[1]
  log = (tmp_path / "log.process1.txt").read_text()
  assert "Terminating process because the JAX distributed service" in log


def test_other_ends_pass_through(tmp_path):
  proc = _start(tmp_path, "exit")
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 3 and err == "worker: training\n"


def test_sigterm_is_forwarded_to_the_worker(tmp_path):
  proc = _start(tmp_path, "wait")
  _worker_pid(tmp_path)
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=60)
  assert proc.returncode == 143


def test_killing_the_launched_process_kills_the_worker(tmp_path):
  proc = _start(tmp_path, "wait")
  worker = _worker_pid(tmp_path)
  proc.kill()
  proc.communicate(timeout=60)
  deadline = time.monotonic() + 30
  while os.path.exists(f"/proc/{worker}") and "zombie" not in _state(worker):
    assert time.monotonic() < deadline, "the worker outlived the launched process"
    time.sleep(0.05)


def _state(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/status") as f:
      return f.read().lower()
  except FileNotFoundError:
    return "zombie"


def test_unknown_abort_reason_still_names_the_timeout():
  text = lost_peer_message("F1 client.h:80] Terminating process ... absl::Status: INTERNAL: "
                           "Shutdown barrier has failed.", workdir="/w", peer_timeout_s=9,
                           log_file="/w/log.txt")
  assert text.startswith("error: lost contact with another process (INTERNAL: Shutdown barrier")
  assert "--peer_timeout_s=9 s" in text and "/w/log.txt" in text
  assert peer_supervisor.FATAL_MARKER.decode() not in text
