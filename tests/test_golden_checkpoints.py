"""Checkpoints written by earlier code restore, and train on as they did when written.

tests/data/golden/<stage> holds a small finished run of each stage (tests/helpers/golden.py
writes them; golden.json the config overrides and the metrics of the steps after restoring).
Each is restored through the API's loader (`runs.load_run`: every stored array lands in the
model, unchanged) and resumed through the training loop for two steps, whose loss, loss terms
and gradient norm must equal the stored ones (the first step checks parameters, data position
and step, the second the optimizer state as well). A change that renames or reshapes a
parameter, or changes what a step computes, fails here unless it keeps old checkpoints loading
(a migration that logs what it converts).
"""
import os

import jax
import numpy as np
import pytest

from psvae_jax import runs, sharding
from psvae_jax.tree_paths import flatten_dotted

from helpers import golden
from helpers.checkpoints import restore_all

ONE_DEVICE = jax.devices()[:1]
# Other CPUs round differently; a real change to the step moves the metrics far more.
METRIC_RTOL = 1e-4


def _item(stored: dict, prefix: str) -> dict:
  """{name: array} of the stored arrays whose key starts with `prefix`, the prefix removed."""
  return {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}


def _assert_restored(restored: dict, stored: dict, what: str) -> None:
  """`restored` names exactly the stored arrays and holds their values."""
  missing = sorted(stored.keys() - restored.keys())
  unexpected = sorted(restored.keys() - stored.keys())
  assert not missing and not unexpected, (
      f"{what}: stored but not restored: {missing[:10]}; restored but not stored: "
      f"{unexpected[:10]}")
  for name, value in stored.items():
    np.testing.assert_array_equal(np.asarray(restored[name]), value, err_msg=f"{what}: {name}")


@pytest.mark.reliability(fault="checkpoint written by an earlier version of the code ({stage})",
                         expected="restores; next-step loss equals the stored value")
@pytest.mark.parametrize("stage", golden.STAGES)
def test_golden_checkpoint_restores_and_trains_on(stage, tmp_path):
  root = str(tmp_path)
  golden.copy_golden(root)  # the parents too: a resumed stage reads its config.init run
  workdir = os.path.join(root, stage)
  record = golden.read_record(workdir)
  step, stored = restore_all(workdir)  # every stored array by name, read without a model
  assert step == record["step"]

  mesh = sharding.make_mesh({"data": 1}, ONE_DEVICE)
  raw = runs.load_run(workdir, mesh, use_ema=False)
  _assert_restored(flatten_dotted(raw.params),
                   {**_item(stored, "state/params."), **_item(stored, "state/frozen.")}, "params")
  _assert_restored(flatten_dotted(raw.other), _item(stored, "state/other."), "other")
  if _item(stored, "ema/"):
    ema = runs.load_run(workdir, mesh, use_ema=True)
    _assert_restored(flatten_dotted(ema.params),
                     {**_item(stored, "ema/"), **_item(stored, "state/frozen.")}, "EMA params")

  summary, metrics = golden.resume(stage, root)
  assert summary["start_step"] == step
  expected = record["metrics_after_restore"]
  assert metrics.keys() == expected.keys()
  for at, recorded in expected.items():  # metrics added since are not compared
    assert recorded.keys() <= metrics[at].keys(), f"metrics no longer logged at step {at}"
    for name, value in recorded.items():
      assert metrics[at][name] == pytest.approx(value, rel=METRIC_RTOL), f"{name} at step {at}"
  # The state the loop restored and trained is saved with the same arrays as the golden one.
  _, after = restore_all(workdir, summary["final_step"])
  assert sorted(after) == sorted(stored)
