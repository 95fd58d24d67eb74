"""psvae_jax.runs: reading another run's checkpoint onto the caller's mesh."""
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import runs, sharding
from psvae_jax import train_state as ts
from psvae_jax.config_base import to_json
from psvae_jax.tasks import get_task

from helpers.configs import tiny_svae_config


def _write_steps(workdir: str, config, steps) -> dict[int, dict]:
  """Checkpoints of `config` at `steps`, each with its own random values; returns each step's
  EMA as a host pure dict."""
  task = get_task(config)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  written = {}
  with jax.set_mesh(mesh):
    setup = ts.make_train_setup(task, config, mesh)
    writer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), async_save=False)
    for step in steps:
      rng = np.random.default_rng(step)
      fill = lambda a: jax.device_put(
          (0.05 * rng.standard_normal(a.shape)).astype(a.dtype), a.sharding)
      state = jax.tree.map(fill, setup.abstract_state)
      ema = jax.tree.map(fill, setup.abstract_ema)
      writer.save(step, state=state, ema=ema, config_json=to_json(config),
                  extras={"note": step})
      written[step] = jax.device_get(ema.to_pure_dict())
    writer.close()
  return written


@pytest.fixture(scope="module")
def svae_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("svae"))
  config = tiny_svae_config(**{"optim.ema_decay": 0.5})
  return workdir, _write_steps(workdir, config, (1, 2))


def test_resolve_checkpoint_dir(tmp_path):
  assert ckpt_lib.resolve_checkpoint_dir("gs://b/run") == "gs://b/run/checkpoints"
  assert ckpt_lib.resolve_checkpoint_dir("gs://b/run/checkpoints") == "gs://b/run/checkpoints"
  assert ckpt_lib.resolve_checkpoint_dir("gs://b/run/checkpoints/") == "gs://b/run/checkpoints"
  os.makedirs(tmp_path / "checkpoints")
  assert ckpt_lib.resolve_checkpoint_dir(str(tmp_path)) == str(tmp_path / "checkpoints")
  assert (ckpt_lib.resolve_checkpoint_dir(str(tmp_path / "checkpoints"))
          == str(tmp_path / "checkpoints"))


def test_load_run_on_the_callers_mesh(svae_run):
  workdir, written = svae_run
  devices = jax.devices()[2:4]
  run = runs.load_run(workdir, sharding.make_mesh({"data": 2}, devices))
  assert (run.step, run.weights, run.extras["note"]) == (2, "ema", 2)
  leaves = jax.tree.leaves(run.params)
  assert all(set(leaf.sharding.device_set) == set(devices) for leaf in leaves)
  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert same(jax.device_get(run.params.filter(run.setup.filters[0]).to_pure_dict()),
              written[2])
  with pytest.raises(ckpt_lib.CheckpointError, match=r"no checkpoint at step 7; have \[1, 2\]"):
    runs.load_run(workdir, sharding.make_mesh({"data": 1}, devices[:1]), step=7)


def test_damaged_newest_step_falls_back(svae_run, tmp_path, caplog):
  source, written = svae_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  os.remove(os.path.join(workdir, "checkpoints", "2", "state", "_METADATA"))
  with caplog.at_level(logging.WARNING):
    run = runs.load_run(workdir, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  assert run.step == 1 and run.extras["note"] == 1
  assert any("step 2" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert same(jax.device_get(run.params.filter(run.setup.filters[0]).to_pure_dict()),
              written[1])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))  # a reader sets nothing aside
