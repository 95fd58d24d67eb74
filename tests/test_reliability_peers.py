"""Faults of one process in a two-process run (helpers/two_processes): killed, or preempted.

- SIGKILL of one process: the other exits 75 with one line naming the lost process and
  --peer_timeout_s, within a bound (the runtime's heartbeat timeout; at once when the lost one is
  process 0, the coordinator). Its checkpoints stay complete, and a restart of both resumes.
- SIGTERM to one process (or both): both save one checkpoint at the same step and exit 143, and
  a restart of both resumes.
A resumed run ends bit-identical to an uninterrupted run of the same steps: params, optimizer
state, EMA and both processes' data positions (one reference run, shared by the slow tests).

In the default suite: one SIGTERM case without restart, one launch (the step compiles in both
processes, about 30 s on 2 idle cores). The kills and the restarts are slow.
"""
import os
import signal
import subprocess
import time

import pytest

from helpers.checkpoints import assert_same_checkpoint, restore_all
from helpers.two_processes import Job, checkpoint_steps, launch
from psvae_jax import checkpoint as ckpt_lib
from psvae_jax.peer_supervisor import EXIT_PEER_LOST, FATAL_MARKER
from psvae_jax.preemption import EXIT_PREEMPTED

TOTAL_STEPS = 8
# Long enough that a heavily loaded 2-core machine (two test workers compiling beside the two
# processes) misses no heartbeat: at 5 s a run under load 29 lost both peers before the kill.
PEER_TIMEOUT_S = 15
# The heartbeat timeout plus what the runtime and a loaded 2-core machine add (about 1 s idle).
EXIT_BOUND_S = 45
OVERRIDES = {"total_steps": TOTAL_STEPS, "log_every": 1, "optim.ema_decay": 0.5}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The final checkpoint of an uninterrupted two-process run."""
  base = tmp_path_factory.mktemp("reference")
  workdir = str(base / "run")
  launch(workdir, str(base), "reference", OVERRIDES)
  return restore_all(workdir)


def _error_lines(log: str) -> list[str]:
  return [line for line in log.splitlines() if line.startswith("error:")]


def _kill_one(tmp_path, victim: int) -> str:
  """SIGKILLs process `victim` after step 3 (step 2 is checkpointed) and checks the survivor's
  exit; returns the workdir."""
  workdir = str(tmp_path / "run")
  survivor = 1 - victim
  with Job(workdir, str(tmp_path), "killed", {**OVERRIDES, "checkpoint_every": 2},
           flags=(f"--peer_timeout_s={PEER_TIMEOUT_S}",)) as job:
    job.wait_for_step(workdir, 3)
    sent = job.signal(victim, signal.SIGKILL)
    try:
      code = job.procs[survivor].wait(timeout=EXIT_BOUND_S + 60)
    except subprocess.TimeoutExpired:
      pytest.fail(f"process {survivor} still running {EXIT_BOUND_S + 60} s after process "
                  f"{victim} was killed\n" + job.tails())
    took = time.monotonic() - sent
    log = job.logs()[survivor]
  print(f"process {survivor} exited {code} {took:.1f} s after SIGKILL of process {victim} "
        f"(--peer_timeout_s={PEER_TIMEOUT_S})")
  assert code == EXIT_PEER_LOST, log[-3000:]
  errors = _error_lines(log)
  assert len(errors) == 1, log[-3000:]
  assert f"lost contact with process {victim}" in errors[0], errors
  assert f"--peer_timeout_s={PEER_TIMEOUT_S}" in errors[0], errors
  assert took < EXIT_BOUND_S, f"{took:.1f} s"
  assert FATAL_MARKER.decode() not in log  # the runtime's report went to the log file
  suffix = "" if survivor == 0 else f".process{survivor}"
  with open(os.path.join(workdir, f"log{suffix}.txt")) as f:
    assert FATAL_MARKER.decode() in f.read()
  return workdir


def _preempt(tmp_path, signalled: str) -> tuple[str, int]:
  """SIGTERMs process `signalled` ('0', '1' or 'both') after step 2 and checks that both
  processes saved one checkpoint at the same step and exited 143; returns (workdir, that step)."""
  workdir = str(tmp_path / "run")
  with Job(workdir, str(tmp_path), "preempted", {**OVERRIDES, "checkpoint_every": 100000}) as job:
    job.wait_for_step(workdir, 2)
    for pid in ((0, 1) if signalled == "both" else (int(signalled),)):
      sent = job.signal(pid, signal.SIGTERM)
    codes = job.wait()
    took = time.monotonic() - sent
    logs = job.logs()
  print(f"SIGTERM to process {signalled}: exit statuses {codes} {took:.1f} s later")
  assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], "\n".join(log[-2000:] for log in logs)
  steps = checkpoint_steps(workdir)
  assert len(steps) == 1, steps
  step = steps[0]
  for log in logs:
    assert f"all 2 processes save at step {step} and exit" in log, log[-3000:]
  # One checkpoint written jointly: both processes' data positions are in it.
  data = sorted(os.listdir(os.path.join(workdir, "checkpoints", str(step), "data")))
  assert data == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"], data
  return workdir, step


def _restart_and_compare(tmp_path, workdir: str, reference) -> None:
  """Restarts both processes to TOTAL_STEPS; the final state must equal `reference`'s."""
  last = checkpoint_steps(workdir)[-1]
  for log in launch(workdir, str(tmp_path), "restarted", OVERRIDES):
    assert f"start at step {last} (workdir step {last})" in log, log[-3000:]
  step, final = restore_all(workdir)
  assert step == TOTAL_STEPS
  assert_same_checkpoint(final, reference[1])


@pytest.mark.slow
@pytest.mark.reliability(fault="SIGKILL of process 1 of a two-process run",
                         expected="process 0 exits 75 within the peer timeout, one line naming "
                         "process 1; its last checkpoint is complete")
def test_lost_process_stops_the_other(tmp_path):
  workdir = _kill_one(tmp_path, victim=1)
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), create=False,
                                       async_save=False)
  try:
    checkpointer.verify(checkpointer.latest_step())  # items and checksum manifest
  finally:
    checkpointer.close()
  assert restore_all(workdir)[0] == checkpoint_steps(workdir)[-1]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
@pytest.mark.reliability(fault="SIGKILL of process {victim} of a two-process run, then restart",
                         expected="the other exits 75 within the peer timeout naming process "
                         "{victim}; the restart resumes bit-exactly")
def test_lost_process_then_restart_resumes_bit_exactly(tmp_path, victim, reference):
  workdir = _kill_one(tmp_path, victim)
  _restart_and_compare(tmp_path, workdir, reference)


@pytest.mark.reliability(fault="SIGTERM to process 1 of a two-process run",
                         expected="both save one checkpoint at the same step and exit 143")
def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
  _preempt(tmp_path, "1")


@pytest.mark.slow
@pytest.mark.parametrize("signalled", ["0", "1", "both"])
@pytest.mark.reliability(fault="SIGTERM to process(es) {signalled} of two, then restart",
                         expected="both save at one step and exit 143; the restart resumes "
                         "bit-exactly")
def test_sigterm_then_restart_resumes_bit_exactly(tmp_path, signalled, reference):
  workdir, _ = _preempt(tmp_path, signalled)
  _restart_and_compare(tmp_path, workdir, reference)
