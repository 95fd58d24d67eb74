"""The wide DDT head: zero start, per-token conditioning, 2D RoPE, RAE's default shape."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.models import ddt_head
from psvae_jax.models.ddt_head import DDTHead, DDTHeadConfig

FAST_COMPILE = {"xla_backend_optimization_level": 0}
SMALL = DDTHeadConfig(width=32, depth=2, num_heads=2)


@functools.partial(jax.jit, static_argnums=(0, 2), compiler_options=FAST_COMPILE)
def _apply(graph, state, grid, args):
  return nnx.merge(graph, state)(*args, grid)


def run(head, grid, *args):
  graph, state = nnx.split(head)
  return _apply(graph, state, grid, args)


def make_head(randomized: bool):
  make = lambda: DDTHead(16, 12, 12, SMALL, rngs=nnx.Rngs(0))
  if not randomized:
    return nnx.jit(make)()
  head = nnx.eval_shape(make)
  rng = np.random.default_rng(0)
  for path, var in nnx.to_flat_state(nnx.state(head, nnx.Param)):
    value = 0.2 * rng.standard_normal(var.get_value().shape)
    if str(getattr(path[-1], "key", path[-1])) == "scale":
      value += 1.0
    var.set_value(jnp.asarray(value, jnp.float32))
  return head


def inputs(grid=(3, 4)):
  ks = jax.random.split(jax.random.key(0), 3)
  n = grid[0] * grid[1]
  return (jax.random.normal(ks[0], (2, n, 12)), jax.random.normal(ks[1], (2, n, 16)),
          jax.random.normal(ks[2], (2, 16)))


def test_starts_at_zero_and_defaults_follow_rae():
  head = make_head(randomized=False)
  out = run(head, (3, 4), *inputs())
  assert out.shape == (2, 12, 12)
  np.testing.assert_array_equal(out, 0.0)
  config = DDTHeadConfig()
  assert (config.width, config.depth, config.num_heads, config.mlp_dim) == (2048, 2, 16, 5461)
  abstract = nnx.eval_shape(lambda: DDTHead(1024, 96, 96, config, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert 150e6 < count < 170e6


def test_conditioning_and_noisy_input_both_matter():
  head = make_head(randomized=True)
  x, tokens, temb = inputs()
  out = run(head, (3, 4), x, tokens, temb)
  assert float(jnp.abs(out).max()) > 1e-2
  for changed in [(x.at[:, 5].multiply(-1.0), tokens, temb),
                  (x, tokens.at[:, 5].multiply(-1.0), temb), (x, tokens, temb + 1.0)]:
    assert float(jnp.abs(run(head, (3, 4), *changed) - out).max()) > 1e-4
  # RoPE makes the head position-aware: a transposed grid of the same tokens differs.
  assert float(jnp.abs(run(head, (4, 3), x, tokens, temb) - out).max()) > 1e-4


def test_rope_is_relative_and_norm_preserving():
  cos, sin = ddt_head.rope_2d_tables(4, 4, 8)
  assert cos.shape == (16, 8)
  vec = jax.random.normal(jax.random.key(1), (8,))
  q = jnp.broadcast_to(vec, (1, 16, 1, 8))
  rotated = ddt_head.apply_rope(q, jnp.asarray(cos), jnp.asarray(sin))[0, :, 0]
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(vec), rtol=1e-5)
  gram = np.asarray(rotated @ rotated.T).reshape(4, 4, 4, 4)
  # <R(p) v, R(p') v> depends only on p' - p: shifting both positions leaves it unchanged.
  np.testing.assert_allclose(gram[0, 0, 1, 2], gram[2, 1, 3, 3], rtol=1e-5)
  np.testing.assert_allclose(gram[1, 3, 0, 1], gram[3, 2, 2, 0], rtol=1e-5)
  # Position (0, 0) is the identity; the first half of the channels rotates with the row.
  np.testing.assert_allclose(rotated[0], vec, rtol=1e-6)
  np.testing.assert_allclose(rotated[1, :4], vec[:4], rtol=1e-6)  # (0, 1): row part fixed
  angle = 1.0  # row 1, first frequency theta^0
  want = [vec[0] * math.cos(angle) - vec[1] * math.sin(angle),
          vec[1] * math.cos(angle) + vec[0] * math.sin(angle)]
  np.testing.assert_allclose(rotated[4, :2], want, rtol=1e-5)
