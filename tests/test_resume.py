"""Stopping and resuming gives the bit-identical run; non-finite values never reach a checkpoint."""
import json
import os

import jax
import numpy as np
import pytest

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import sharding
from psvae_jax import train as train_lib

from helpers.runs import read_run


def _final_state(config, workdir):
  return read_run(workdir, config, sharding.make_mesh(config.mesh))


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row for row in map(json.loads, f)}


@pytest.mark.reliability(fault="stopped at step 2 and resumed in the same workdir",
                         expected="state, EMA, loss bit-identical to an uninterrupted run")
def test_resume_is_bit_identical(tmp_path, svae_config):
  config = svae_config(**{"optim.ema_decay": 0.5, "total_steps": 4, "checkpoint_every": 2})
  straight = str(tmp_path / "straight")
  train_lib.train(config, straight)

  resumed = str(tmp_path / "resumed")
  half = svae_config(**{"optim.ema_decay": 0.5, "total_steps": 2, "checkpoint_every": 2})
  train_lib.train(half, resumed)
  summary = train_lib.train(config, resumed)
  assert summary["start_step"] == 2 and summary["source"] == "workdir step 2"

  step_a, a = _final_state(config, straight)
  step_b, b = _final_state(config, resumed)
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # The logged loss at the last step is the same number too (same data, same RNG).
  assert _metrics(straight)[4]["loss"] == _metrics(resumed)[4]["loss"]
  with open(os.path.join(resumed, "config.json")) as f:
    assert json.load(f)["total_steps"] == 4


@pytest.mark.reliability(fault="NaN loss at every step (nonfinite='{mode}')",
                         expected="raise: NonFiniteError, no checkpoint; skip: checkpoint finite")
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_loss_is_caught_and_never_checkpointed(tmp_path, svae_config, mode):
  config = svae_config(**{"nonfinite": mode, "loss.kl_weight": float("nan"),
                          "total_steps": 2, "checkpoint_every": 1})
  workdir = str(tmp_path / mode)
  if mode == "raise":
    with pytest.raises(train_lib.NonFiniteError, match="at step 0"):
      train_lib.train(config, workdir)
    assert ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir)).latest_step() is None
  else:
    train_lib.train(config, workdir)
    step, restored = _final_state(config, workdir)
    assert step == 2 and int(restored["state"]["skipped"]) == 2
    for leaf in jax.tree.leaves(restored["state"]["params"]):
      assert np.all(np.isfinite(leaf))
