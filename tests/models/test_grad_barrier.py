"""materialize_grad: an exact identity in value and gradient that stops XLA:CPU from
recomputing a residual stream's gradient chain inside every block's backward fusions."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psvae_jax.models.grad_barrier import materialize_grad


def _residual_stack(x, weights, barrier: bool):
  """Pre-norm residual blocks (norm -> matmul -> tanh, added back), as in a transformer."""
  for w in weights:
    if barrier:
      x = materialize_grad(x)
    h = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
    x = x + jnp.tanh(h @ w) * 0.5
  return jnp.sum(x ** 2)


def _inputs(depth=8, width=64, rows=128):
  keys = jax.random.split(jax.random.key(0), depth + 1)
  x = jax.random.normal(keys[0], (rows, width))
  weights = [jax.random.normal(k, (width, width)) / np.sqrt(width) for k in keys[1:]]
  return x, weights


def test_value_and_gradients_are_unchanged():
  x, weights = _inputs()
  for argnums in (0, 1):
    plain = jax.grad(lambda x, w: _residual_stack(x, w, False), argnums)(x, weights)
    barred = jax.grad(lambda x, w: _residual_stack(x, w, True), argnums)(x, weights)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(barred)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert float(_residual_stack(x, weights, True)) == float(_residual_stack(x, weights, False))
  tree = {"a": jnp.ones(3), "b": (jnp.zeros(2),)}
  assert jax.tree.structure(materialize_grad(tree)) == jax.tree.structure(tree)


def _largest_fusion_operands(barrier: bool) -> int:
  x, weights = _inputs()
  step = jax.jit(jax.grad(lambda x, w: _residual_stack(x, w, barrier), argnums=(0, 1)))
  hlo = step.lower(x, weights).compile().as_text()
  counts = [m.group(1).count("%") for m in re.finditer(r" fusion\((.*?)\), kind=kLoop", hlo)]
  return max(counts)


def test_backward_fusions_stay_per_block_on_cpu():
  """Without the barrier the backward fusions grow with depth (each one recomputes the gradient
  of every later block); with it they stay the size of one block's."""
  if jax.default_backend() != "cpu":
    pytest.skip("the fusion heuristic checked here is XLA:CPU's")
  with_barrier = _largest_fusion_operands(True)
  assert with_barrier <= 12, with_barrier
  assert _largest_fusion_operands(False) > with_barrier
