"""paired_batch: join/split are inverse, and under a batch-sharded mesh the split moves nothing
between devices (where concatenate + halves does)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from psvae_jax.models import paired_batch


def test_join_interleaves_and_split_inverts():
  x, y = jnp.arange(6.0).reshape(3, 2), -jnp.arange(6.0).reshape(3, 2)
  both = paired_batch.join(x, y)
  np.testing.assert_array_equal(both[::2], x)
  np.testing.assert_array_equal(both[1::2], y)
  x2, y2 = paired_batch.split(both * 2)
  np.testing.assert_array_equal(x2, 2 * x)
  np.testing.assert_array_equal(y2, 2 * y)
  with pytest.raises(ValueError, match="same shape"):
    paired_batch.join(x, y[:2])


def _collectives(fn, batch_sharding, shape):
  text = jax.jit(fn).lower(jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding),
                           jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding)
                           ).compile().as_text()
  return [op for op in ("collective-permute", "all-to-all", "all-gather", "all-reduce")
          if op in text]


def test_split_of_a_sharded_batch_moves_no_data():
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = jax.sharding.Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))
  by_batch = NamedSharding(mesh, P("data"))

  def paired(x, y):
    a, b = paired_batch.split(jax.lax.with_sharding_constraint(
        jnp.tanh(paired_batch.join(x, y)), by_batch))
    return a - b

  def concatenated(x, y):
    f = jax.lax.with_sharding_constraint(jnp.tanh(jnp.concatenate([x, y])), by_batch)
    return f[:x.shape[0]] - f[x.shape[0]:]

  shape = (4 * len(devices), 16)
  assert _collectives(paired, by_batch, shape) == []
  assert _collectives(concatenated, by_batch, shape)  # the old way moved data
