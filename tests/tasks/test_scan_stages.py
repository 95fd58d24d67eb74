"""Scanned layers in the training loop: a PS-VAE stage started from an unscanned S-VAE run
trains scanned with the same first-step loss as the unscanned stage, its scanned checkpoint
resumes, and an unscanned stage starts from a scanned parent run."""
import json

import jax
import numpy as np
import pytest

from psvae_jax import train as train_lib
from psvae_jax.models.scan_layout import match_scan_layout

from helpers.checkpoints import restore_params
from helpers.configs import psvae_config_from_svae_run, t2i_config_for, tiny_psvae_config


def _first_metrics(workdir):
  with open(f"{workdir}/metrics.jsonl") as f:
    return json.loads(f.readline())


def _psvae(svae_config, parent, scan, **overrides):
  config = psvae_config_from_svae_run(svae_config, parent)
  config.total_steps = 1
  config.log_every = 1
  config.model.scan_layers = scan
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.mark.slow
def test_psvae_scanned_from_unscanned_svae_matches_unscanned(tmp_path, svae_config):
  svae_dir = str(tmp_path / "svae")
  train_lib.train(svae_config(**{"total_steps": 1, "optim.ema_decay": 0.0}), svae_dir)

  runs = {}
  for scan in (False, True):
    workdir = str(tmp_path / f"psvae_scan{int(scan)}")
    config = _psvae(svae_config, svae_dir, scan)
    summary = train_lib.train(config, workdir)
    assert summary["source"] == f"init {svae_dir}"
    runs[scan] = (config, workdir)
  plain, scanned = (_first_metrics(runs[s][1]) for s in (False, True))
  assert plain["step"] == scanned["step"]
  for key in ("loss", "semantic_loss", "kl"):
    if key in plain:
      np.testing.assert_allclose(scanned[key], plain[key], rtol=1e-5, err_msg=key)
  # The groups loaded from the parent: the frozen teacher is identical; the trained ones moved
  # by one AdamW step, which moves a weight by at most ~lr (a near-zero gradient's sign may
  # differ between the two float summation orders). Fresh groups (the discriminator) differ:
  # the scanned model draws its initial values in another order.
  _, params_plain, _ = restore_params(*runs[False])
  _, params_scan, _ = restore_params(*runs[True])
  lr = runs[False][0].optim.lr
  for group, bound in (("teacher", 0.0), ("encoder", 2.5 * lr), ("svae", 2.5 * lr),
                       ("pixel_decoder", 2.5 * lr)):
    converted = match_scan_layout(params_scan[group], params_plain[group])
    worst = max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), converted,
        params_plain[group])))
    assert worst <= bound, (group, worst)

  # The scanned run resumes from its own (scanned) checkpoint.
  config, workdir = runs[True]
  config.total_steps = 2
  summary = train_lib.train(config, workdir)
  assert summary["source"] == "workdir step 1" and summary["start_step"] == 1


@pytest.mark.slow
def test_unscanned_psvae_from_scanned_svae(tmp_path, svae_config):
  svae_dir = str(tmp_path / "svae")
  svae = svae_config(**{"total_steps": 1, "optim.ema_decay": 0.0, "model.scan_layers": True})
  train_lib.train(svae, svae_dir)
  _, svae_params, _ = restore_params(svae, svae_dir)
  config = _psvae(svae_config, svae_dir, False)
  train_lib.train(config, str(tmp_path / "psvae"))
  _, params, _ = restore_params(config, str(tmp_path / "psvae"))
  # The frozen teacher is the scanned S-VAE's encoder, unstacked.
  teacher = match_scan_layout(params["teacher"], svae_params["encoder"])
  assert jax.tree.all(jax.tree.map(np.array_equal, teacher, svae_params["encoder"]))


def test_t2i_step_scanned_matches_unscanned():
  """One T2I loss and gradient (text encoder, autoencoder encoder and E_s, MMDiT scanned)
  equal the unscanned step's on the same parameters, converted (the DDT head's scan is
  checked in tests/models/test_scan_layout.py)."""
  from psvae_jax import sharding
  from psvae_jax import train_state as ts
  from psvae_jax.tasks import get_task

  captions = np.array(["a red circle", "two blue squares", "", "a green triangle"] * 2,
                      dtype=object)
  images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  out, reference = {}, None
  for scan in (False, True):
    config = t2i_config_for(tiny_psvae_config(), **{"model.require_autoencoder": False,
                                             "model.scan_layers": scan,
                                             "model.autoencoder.scan_layers": scan})
    task = get_task(config)
    batch = task.prepare_batch({"image": images, "caption": captions})
    with jax.set_mesh(mesh):
      layout = ts.make_train_setup(task, config, mesh)
      state = ts.init_state(task, config, layout)
      if reference is not None:
        params = ts.all_params(state)
        params.replace_by_pure_dict(match_scan_layout(reference, params))
        state["params"], state["frozen"] = ts.split_params(layout, params)
      else:
        reference = ts.all_params(state).to_pure_dict()

      def loss(trainable, frozen, other, batch):
        return task.loss(layout.merge(trainable, frozen, other), batch, jax.random.key(3), 0)[0]

      value, grads = jax.jit(jax.value_and_grad(loss))(state["params"], state["frozen"],
                                                       state["other"], batch)
    out[scan] = (float(value), grads.to_pure_dict())
  np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-5)
  grads = match_scan_layout(out[True][1], out[False][1])
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(out[False][1]))
  worst = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), grads, out[False][1])))
  assert worst <= 1e-5 * scale, (worst, scale)
