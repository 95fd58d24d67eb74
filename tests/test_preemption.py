"""SIGTERM (preemptible TPU VMs, SLURM) writes a checkpoint at the current step, exits 143, and
the next launch continues from exactly that step."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.configs import SVAE_SMOKE_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --log_level=info: the assertions read the library's INFO lines from the console.
ARGS = [*SVAE_SMOKE_FLAGS, "--log_level=info", "--config.checkpoint_every=100000",
        "--config.log_every=1"]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  return env


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.mark.reliability(fault="SIGTERM (preemption) during training",
                         expected="checkpoint at that step, exit 143; next launch continues")
def test_sigterm_saves_and_resumes_at_that_step(tmp_path):
  workdir = str(tmp_path / "run")
  # Both launches share a compilation cache: the resumed run reuses the compiled step.
  cache = f"--compilation_cache_dir={tmp_path / 'xla_cache'}"
  proc = subprocess.Popen([sys.executable, "-m", "psvae_jax.main", f"--workdir={workdir}", *ARGS,
                           cache, "--config.total_steps=100000"],
                          cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  try:
    deadline = time.time() + 300
    while len(_logged_steps(workdir)) < 3:
      assert proc.poll() is None, proc.stdout.read()[-3000:]
      assert time.time() < deadline, "training did not start logging in time"
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 143, output[-3000:]
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert len(saved) == 1 and saved[0] >= 3
  stop_step = saved[0]

  resumed = subprocess.run(
      [sys.executable, "-m", "psvae_jax.main", f"--workdir={workdir}", *ARGS, cache,
       f"--config.total_steps={stop_step + 2}"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"start at step {stop_step} (workdir step {stop_step})" in resumed.stderr
  assert _logged_steps(workdir)[-2:] == [stop_step + 1, stop_step + 2]
