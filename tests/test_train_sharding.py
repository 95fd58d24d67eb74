"""The train step gives the same result on 1 device and on 8 devices with DP / FSDP / TP meshes."""
import jax
import numpy as np
import pytest

from psvae_jax import sharding
from psvae_jax import train as train_lib
from psvae_jax import train_state as ts
from psvae_jax.tasks import get_task


def _run_steps(config, devices, mesh_config, batch, steps):
  mesh = sharding.make_mesh(mesh_config, devices)
  task = get_task(config)
  with jax.set_mesh(mesh):
    layout = ts.make_train_setup(task, config, mesh)
    state = ts.init_state(task, config, layout)
    ema = ts.init_ema(state, layout)
    step = train_lib.jit_train_step(task, layout, config)
    losses = []
    for _ in range(steps):
      state, ema, metrics = step(state, ema, sharding.host_local_to_global(batch, mesh))
      losses.append(float(metrics["loss"]))
    specs = {ts_path: leaf.sharding.spec for ts_path, leaf in
             jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    params = jax.device_get(state["params"].to_pure_dict())
  return losses, params, specs


@pytest.fixture(scope="module")
def single_device_run():
  from helpers.configs import tiny_svae_config
  # A large Adam epsilon: with the default 1e-8, gradient entries that are pure rounding noise
  # (~1e-9) become full +-lr updates and make parameter comparisons meaningless.
  config = tiny_svae_config(**{"optim.eps": 1e-3})
  batch = {"image": np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)}
  losses, params, _ = _run_steps(config, jax.devices()[:1],
                                 {"data": 1, "fsdp": 1, "tensor": 1}, batch, 3)
  return config, batch, losses, params


@pytest.mark.parametrize("mesh_config", [
    {"data": 8, "fsdp": 1, "tensor": 1},  # pure data parallel
    {"data": 2, "fsdp": 2, "tensor": 2},  # data x FSDP x tensor parallel
])
def test_step_matches_single_device(single_device_run, mesh_config):
  config, batch, ref_losses, ref_params = single_device_run
  losses, params, specs = _run_steps(config, jax.devices(), mesh_config, batch, 3)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               params, ref_params)
  if mesh_config["fsdp"] > 1:
    assert any("fsdp" in str(spec) for spec in specs.values()), "no parameter is FSDP-sharded"
  if mesh_config["tensor"] > 1:
    assert any("tensor" in str(spec) for spec in specs.values()), "no parameter is TP-sharded"
