"""Convolutional networks are not replicated over the tensor axis: their activations take it
over the batch, or over image rows when the batch does not divide (XLA's per-device FLOPs)."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from psvae_jax import sharding
from psvae_jax.models import discriminator


def _per_device_flops(mesh_config, batch):
  model = discriminator.NLayerDiscriminator(ndf=8, n_layers=2, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  size = mesh_config["data"] * mesh_config["fsdp"] * mesh_config["tensor"]
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:size])
  images = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32,
                                sharding=sharding.batch_sharding(mesh, 4))
  with jax.set_mesh(mesh):
    loss = lambda s, x: nnx.merge(graphdef, s)(x).sum()
    compiled = jax.jit(jax.grad(loss)).lower(state, images).compile()
  return compiled.cost_analysis()["flops"]


@pytest.mark.parametrize("batch", [8, 12])  # 12: batch over the 2 data shards, rows over tensor
def test_conv_work_is_split_over_the_tensor_axis(batch):
  # The 2-device run's per-device work spread over 8 devices: the ideal with tensor=4.
  data_only = _per_device_flops({"data": 2, "fsdp": 1, "tensor": 1}, batch) * 2 / 8
  with_tensor = _per_device_flops({"data": 2, "fsdp": 1, "tensor": 4}, batch)
  # Replicated over tensor this would be 4x data_only; halos and BatchNorm statistics add a little.
  assert with_tensor < 1.5 * data_only, (with_tensor, data_only)


def test_leading_axes_that_divide_are_kept():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}, jax.devices())
  assert sharding.logical_to_pspec(sharding.IMAGE_AXES, (6, 16, 16, 3), mesh) == \
      jax.sharding.PartitionSpec("fsdp", "tensor", None, None)
  assert sharding.logical_to_pspec(sharding.IMAGE_AXES, (8, 16, 16, 3), mesh) == \
      jax.sharding.PartitionSpec(("fsdp", "tensor"), None, None, None)
