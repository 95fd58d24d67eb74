"""Crash-safe resume: a run killed with SIGKILL at any moment (mid-training, or while an async
checkpoint is being written) restarts from its newest complete checkpoint and ends bit-identical
(params, optimizer state, EMA, data position) to a run that was never interrupted.

The killed process runs with a fault hook that stops it at a chosen moment and announces it
through a marker file; the test then sends SIGKILL. Hooked moments: Orbax's temporary step
directory created but no data written yet ('before_data'); all data written but the directory
not yet renamed to its final name ('before_rename'); between checkpoints, after a step's update
('after_step'). 'random' kills at a seeded random time instead.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from helpers.checkpoints import assert_same_checkpoint, restore_all

pytestmark = pytest.mark.reliability

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

# Installs the fault hook named by PSVAE_FAULT ('<moment>:<step>'), then runs either
# `python -m psvae_jax.main ARGS` or (argv[1] == '--toy') the toy task of the checkpoint tests.
_LAUNCHER = r'''
import os, runpy, sys, time
from orbax.checkpoint._src.path import atomicity
from psvae_jax import metrics_log

moment, _, at = os.environ.get("PSVAE_FAULT", "").partition(":")

def stall(where):
  with open(os.environ["PSVAE_FAULT_MARKER"], "w") as f:
    f.write(where)
  while True:  # until SIGKILL
    time.sleep(60)

rename = atomicity.AtomicRenameTemporaryPath
if moment == "before_data":
  create = rename.create
  async def create_then_stall(self):
    path = await create(self)
    if self.get_final().name == at:
      stall(str(path))
    return path
  rename.create = create_then_stall
elif moment == "before_rename":
  finalize = rename.finalize
  async def stall_then_finalize(self):
    if self.get_final().name == at:
      stall(str(self.get()))
    await finalize(self)
  rename.finalize = stall_then_finalize
elif moment == "after_step":
  scalars = metrics_log.RunLogger.scalars
  def scalars_then_stall(self, step, values):
    scalars(self, step, values)
    if step == int(at):
      # Between checkpoints: let the async write of the previous one finish first.
      checkpoints = os.path.join(self.workdir, "checkpoints")
      deadline = time.time() + 300
      while time.time() < deadline and any(
          ".orbax-checkpoint-tmp" in name for name in os.listdir(checkpoints)):
        time.sleep(0.05)
      stall(f"after step {step}")
  metrics_log.RunLogger.scalars = scalars_then_stall

if sys.argv[1] == "--toy":
  sys.path.insert(0, os.environ["PSVAE_TESTS_DIR"])
  import json
  from psvae_jax import train
  from helpers.toy_task import TOY_TASK_ENTRY, toy_config
  from psvae_jax.tasks import TASKS
  TASKS["toy"] = TOY_TASK_ENTRY
  train.train(toy_config(**json.loads(sys.argv[3])), sys.argv[2])
else:
  sys.argv = ["psvae_jax.main", *sys.argv[1:]]
  runpy.run_module("psvae_jax.main", run_name="__main__", alter_sys=True)
'''

TOTAL_STEPS, CHECKPOINT_EVERY = 6, 2
MAIN_ARGS = ["--config=configs/svae.py:smoke", "--config.eval_every=0", "--config.log_every=1",
             "--config.logging.tensorboard=False", "--config.model.svae_depth=1",
             "--config.model.encoder_resolution=56", "--config.model.latent_channels=8",
             "--config.data.image_size=32", "--config.data.synthetic_size=512",
             "--config.model.pixel_decoder.ch_mult=(1,1,1,2)",
             "--config.model.pixel_decoder.resolution=32", "--config.batch_size=8",
             "--config.eval_batches=1", "--config.optim.ema_decay=0.5",
             f"--config.checkpoint_every={CHECKPOINT_EVERY}",
             f"--config.total_steps={TOTAL_STEPS}"]
TOY_OVERRIDES = {"total_steps": TOTAL_STEPS, "checkpoint_every": CHECKPOINT_EVERY}


def _command(kind, workdir, cache):
  if kind == "toy":
    return [sys.executable, "-c", _LAUNCHER, "--toy", workdir, json.dumps(TOY_OVERRIDES)]
  return [sys.executable, "-c", _LAUNCHER, f"--workdir={workdir}", *MAIN_ARGS,
          f"--compilation_cache_dir={cache}"]


def _env(kind, fault="", marker=""):
  env = dict(os.environ)
  flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  if kind == "toy":  # the device count of the in-process runs: the same numbers
    flags += " --xla_force_host_platform_device_count=8"
  env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PSVAE_FAULT=fault, PSVAE_FAULT_MARKER=marker,
             PSVAE_TESTS_DIR=TESTS)
  return env


def _run(kind, workdir, cache):
  result = subprocess.run(_command(kind, workdir, cache), cwd=REPO, env=_env(kind),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stderr


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f if line.strip().endswith("}")]


def _kill_at(kind, workdir, cache, moment, tmp_path, seed=0):
  """Starts a run, SIGKILLs it at `moment`; returns a description of where it was killed."""
  marker = str(tmp_path / f"stalled_{moment}")
  fault = {"before_data": "before_data:4", "before_rename": "before_rename:4",
           "after_step": "after_step:3", "random": ""}[moment]
  log_path = tmp_path / f"killed_{moment}.log"  # a file, not a pipe: a full pipe would block it

  def alive_and_in_time(what):
    log = log_path.read_text()[-4000:] if log_path.exists() else ""
    assert proc.poll() is None, f"the run ended before {what}: {log}"
    assert time.time() < deadline, f"the run never reached {what}: {log}"

  with open(log_path, "w") as log_file:
    proc = subprocess.Popen(_command(kind, workdir, cache), cwd=REPO,
                            env=_env(kind, fault, marker), stdout=log_file, stderr=log_file)
  try:
    deadline = time.time() + 600
    if moment == "random":
      while not _logged_steps(workdir):
        alive_and_in_time("its first logged step")
        time.sleep(0.05)
      delay = random.Random(seed).uniform(0.0, 2.0)
      time.sleep(delay)
      where = f"{delay:.2f} s after the first logged step (seed {seed})"
    else:
      while not os.path.exists(marker):
        alive_and_in_time(fault)
        time.sleep(0.05)
      with open(marker) as f:
        where = f.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return where


def _check_resume(kind, tmp_path, moment, reference, cache, seed=0):
  workdir = str(tmp_path / f"killed_{moment}")
  where = _kill_at(kind, workdir, cache, moment, tmp_path, seed)
  checkpoints = os.path.join(workdir, "checkpoints")
  left = sorted(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else []
  if moment in ("before_data", "before_rename"):
    assert "4.orbax-checkpoint-tmp" in left and "4" not in left, (where, left)
  if moment != "random":
    assert max((int(s) for s in left if s.isdigit()), default=None) == 2, (where, left)
  log = _run(kind, workdir, cache)
  complete = [int(s) for s in left if s.isdigit()]
  expected_source = f"workdir step {max(complete)}" if complete else "scratch"
  if kind == "main":
    assert f"({expected_source})" in log, (where, left, log[-3000:])
  if any(".orbax-checkpoint-tmp" in name for name in left):
    assert "was never finalized" in log
  step, final = restore_all(workdir)
  assert step == TOTAL_STEPS
  assert_same_checkpoint(final, reference)
  print(f"killed {where}; left {left}; resumed from {expected_source}")  # shown with -s


@pytest.fixture(scope="module")
def main_reference(tmp_path_factory):
  root = tmp_path_factory.mktemp("main")
  cache = str(root / "xla_cache")
  workdir = str(root / "straight")
  _run("main", workdir, cache)
  return restore_all(workdir)[1], cache


@pytest.mark.reliability(
    fault="SIGKILL while step 4's checkpoint awaits its rename (toy task)",
    expected="restart resumes from step 2; final state, EMA, data position bit-identical")
def test_sigkill_before_rename_resumes_identical(tmp_path, monkeypatch):
  """Fast variant (toy task): killed while step 4's checkpoint waits to be renamed."""
  from psvae_jax import train as train_lib
  from psvae_jax.tasks import TASKS
  from helpers.toy_task import TOY_TASK_ENTRY, toy_config
  monkeypatch.setitem(TASKS, "toy", TOY_TASK_ENTRY)
  straight = str(tmp_path / "straight")
  train_lib.train(toy_config(**TOY_OVERRIDES), straight)
  _check_resume("toy", tmp_path, "before_rename", restore_all(straight)[1], cache="")


@pytest.mark.reliability(
    fault="SIGKILL of python -m psvae_jax.main: {moment}",
    expected="resumes from the newest complete step; final state, EMA, data bit-identical")
@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before_data", "before_rename", "after_step", "random"])
def test_sigkill_of_main_resumes_identical(tmp_path, main_reference, moment):
  reference, cache = main_reference
  _check_resume("main", tmp_path, moment, reference, cache,
                seed=int(os.environ.get("PSVAE_KILL_SEED", "0")))
