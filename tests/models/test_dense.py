"""dense.Linear / dense.project: the same values and parameters as nnx.Linear / einsum, for
inputs with several leading dimensions, and the same gradients."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.models import dense


def test_linear_matches_nnx_linear():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  ours = dense.Linear(8, 6, rngs=nnx.Rngs(1))
  ref = nnx.Linear(8, 6, rngs=nnx.Rngs(1))
  assert jax.tree.map(jnp.shape, nnx.state(ours)) == jax.tree.map(jnp.shape, nnx.state(ref))
  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6, atol=1e-6)

  def loss(module):
    return jnp.sum(jnp.sin(module(x)))
  g_ours, g_ref = nnx.grad(loss)(ours), nnx.grad(loss)(ref)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_project_matches_einsum():
  x = jax.random.normal(jax.random.key(0), (2, 7, 8))
  kernel = jax.random.normal(jax.random.key(1), (8, 3, 4))
  np.testing.assert_allclose(dense.project(x, kernel), jnp.einsum("bsd,dpe->bspe", x, kernel),
                             rtol=1e-5, atol=1e-5)
  assert dense.project(x[0, 0], kernel).shape == (3, 4)
