"""Checkpoints restore onto a different mesh, and restore failures are loud."""
import jax
import numpy as np
import pytest

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import sharding
from psvae_jax import train_state as ts
from psvae_jax.tasks import get_task


def _layout(config, mesh_config):
  mesh = sharding.make_mesh(mesh_config)
  task = get_task(config)
  with jax.set_mesh(mesh):
    layout = ts.make_train_setup(task, config, mesh)
  return task, mesh, layout


def test_restore_onto_a_different_mesh(tmp_path, svae_config):
  config = svae_config(**{"optim.ema_decay": 0.9})
  task, mesh_a, layout_a = _layout(config, {"data": 8, "fsdp": 1, "tensor": 1})
  with jax.set_mesh(mesh_a):
    state = ts.init_state(task, config, layout_a)
    ema = ts.init_ema(state, layout_a)
  saver = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  saver.save(3, state=state, ema=ema, config_json="{}")
  saver.close()

  _, mesh_b, layout_b = _layout(config, {"data": 1, "fsdp": 4, "tensor": 2})
  with jax.set_mesh(mesh_b):
    restorer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), create=False)
    assert restorer.latest_step() == 3
    restored = restorer.restore(3, abstract_state=layout_b.abstract_state,
                                abstract_ema=layout_b.abstract_ema)
    restorer.close()
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(restored["ema"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The restored arrays live on the new mesh with its shardings.
  leaves = jax.tree.leaves(restored["state"]["params"])
  assert all(leaf.sharding.mesh.shape == mesh_b.shape for leaf in leaves)
  assert any("fsdp" in str(leaf.sharding.spec) for leaf in leaves)


@pytest.mark.reliability(fault="checkpoint from another model shape",
                         expected="CheckpointError naming each mismatched array")
def test_restore_with_another_model_shape_names_the_cause(tmp_path, svae_config):
  config = svae_config()
  task, mesh, layout = _layout(config, {"data": 8})
  with jax.set_mesh(mesh):
    state = ts.init_state(task, config, layout)
  saver = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  saver.save(1, state=state)
  saver.close()
  wider = svae_config(**{"model.latent_channels": 16})
  _, mesh, layout_wide = _layout(wider, {"data": 8})
  with jax.set_mesh(mesh):
    restorer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), create=False)
    expected = (r"cannot restore(.|\n)*"
                r"params.svae.enc_proj.fc2.kernel.value: checkpoint \(64, 16\) vs model \(64, 32\)")
    with pytest.raises(ckpt_lib.CheckpointError, match=expected):
      restorer.restore(1, abstract_state=layout_wide.abstract_state)
