"""A grain worker process SIGKILLed during a real training run (`python -m psvae_jax.main`,
data.num_workers=2): restarted in place, the run ends bit-identical to an uninterrupted one; with
no restart allowed, the run exits 2 with one error line naming the data pipeline and the worker,
and the next launch resumes from its last checkpoint to the same bit-identical end."""
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.checkpoints import assert_same_checkpoint, restore_all
from helpers.processes import grain_worker_pids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS, STALL_AT = 16, 3
ARGS = ["--config=configs/svae.py:smoke", "--config.eval_every=0", "--config.log_every=1",
        "--config.logging.tensorboard=False", "--config.model.svae_depth=1",
        "--config.model.encoder_resolution=56", "--config.model.latent_channels=8",
        "--config.data.image_size=32", "--config.data.synthetic_size=512",
        "--config.data.num_workers=2", "--config.data.prefetch=1",
        "--config.model.pixel_decoder.ch_mult=(1,1,1,2)",
        "--config.model.pixel_decoder.resolution=32", "--config.batch_size=8",
        "--config.eval_batches=1", "--config.optim.ema_decay=0.5",
        "--config.checkpoint_every=2", f"--config.total_steps={TOTAL_STEPS}"]

# With PSVAE_STALL_AT=<step>: after logging that step the run announces it (the marker file) and
# waits for the go file, so that the test can kill a worker at a known point; then runs on.
_LAUNCHER = r'''
import os, runpy, sys, time
from psvae_jax import metrics_log

stall_at = int(os.environ.get("PSVAE_STALL_AT", "0"))
scalars = metrics_log.RunLogger.scalars
def scalars_then_stall(self, step, values):
  scalars(self, step, values)
  if step == stall_at:
    marker = os.environ["PSVAE_STALL_MARKER"]
    open(marker, "w").close()
    while not os.path.exists(marker + ".go"):
      time.sleep(0.05)
metrics_log.RunLogger.scalars = scalars_then_stall
sys.argv = ["psvae_jax.main", *sys.argv[1:]]
runpy.run_module("psvae_jax.main", run_name="__main__", alter_sys=True)
'''


def _command(workdir, cache, *extra):
  return [sys.executable, "-c", _LAUNCHER, f"--workdir={workdir}", *ARGS,
          f"--compilation_cache_dir={cache}", *extra]


def _env(stall_at=0, marker=""):
  return dict(os.environ, JAX_PLATFORMS="cpu", PSVAE_STALL_AT=str(stall_at),
              PSVAE_STALL_MARKER=marker,
              XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


def _run(workdir, cache):
  result = subprocess.run(_command(workdir, cache), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  root = tmp_path_factory.mktemp("workers")
  cache = str(root / "xla_cache")
  _run(str(root / "straight"), cache)
  return restore_all(str(root / "straight"))[1], cache


def _kill_a_worker_midway(workdir, cache, tmp_path, restarts):
  """Runs until STALL_AT, SIGKILLs one grain worker, lets the run go on; returns (exit status,
  stderr, killed pid, seconds from the kill to the exit)."""
  marker = str(tmp_path / "stalled")
  log_path = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would block the run
  with open(log_path, "w") as log:
    proc = subprocess.Popen(_command(workdir, cache, f"--config.data.worker_restarts={restarts}"),
                            cwd=REPO, env=_env(STALL_AT, marker), stdout=log, stderr=log)
  try:
    deadline = time.time() + 600
    while not os.path.exists(marker):
      assert proc.poll() is None, log_path.read_text()[-4000:]
      assert time.time() < deadline, "the run never reached the stall step"
      time.sleep(0.1)
    pids = grain_worker_pids(proc.pid)
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    killed_at = time.monotonic()
    open(marker + ".go", "w").close()
    proc.wait(timeout=300)
    return proc.returncode, log_path.read_text(), pids[0], time.monotonic() - killed_at
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.mark.slow
@pytest.mark.reliability(
    fault="SIGKILL of a grain worker during training (main, data.worker_restarts={restarts})",
    expected="restarts=1: run goes on, ends bit-identical; restarts=0: exit 2 with one error line "
             "naming the data pipeline and the worker; the resumed run ends bit-identical")
@pytest.mark.parametrize("restarts", [1, 0])
def test_worker_killed_during_training(reference, tmp_path, restarts):
  expected, cache = reference
  workdir = str(tmp_path / "run")
  status, log, pid, seconds = _kill_a_worker_midway(workdir, cache, tmp_path, restarts)
  errors = [line for line in log.splitlines() if line.startswith("error:")]
  if restarts:
    assert status == 0, log[-4000:]
    assert f"worker pid {pid} was killed by SIGKILL" in log and "restart 1 of" in log, log[-4000:]
    assert not errors
  else:
    assert status == 2, log[-4000:]
    assert len(errors) == 1 and "Traceback" not in log, log[-4000:]
    assert errors[0].startswith("error: data pipeline (") and \
        f"worker pid {pid} was killed by SIGKILL" in errors[0], errors[0]
    assert seconds < 120, seconds
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps and steps[-1] < TOTAL_STEPS, steps
    resumed = _run(workdir, cache)
    assert f"(workdir step {steps[-1]})" in resumed, resumed[-3000:]
  step, final = restore_all(workdir)
  assert step == TOTAL_STEPS
  assert_same_checkpoint(final, expected)
  print(f"restarts={restarts}: exit {status} {seconds:.1f} s after the kill; "
        f"{errors[0] if errors else 'no error'}")  # shown with -s
