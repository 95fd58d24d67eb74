"""psvae_jax.tools.hlo_breakdown: dot/convolution FLOPs per source file of a compiled step."""
import jax
import jax.numpy as jnp
from flax import nnx

from psvae_jax.models import discriminator
from psvae_jax.tools import hlo_breakdown


def test_dot_and_conv_flops_are_exact_and_attributed():
  d = discriminator.NLayerDiscriminator(ndf=8, n_layers=1, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(d)

  def f(state, images, x, w):
    return nnx.merge(graphdef, state)(images).sum() + jnp.dot(x, w).sum()

  compiled = jax.jit(f).lower(state, jnp.ones((2, 16, 16, 3)), jnp.ones((8, 16)),
                              jnp.ones((16, 4))).compile()
  flops = hlo_breakdown.breakdown(compiled.as_text())["flops"]
  # conv_in 4x4/2 3->8 on 16x16 -> 8x8; conv 4x4/1 8->16 -> 7x7; conv_out 4x4/1 16->1 -> 6x6.
  conv = 2 * 2 * (8 * 8 * 8 * 48 + 7 * 7 * 16 * 128 + 6 * 6 * 1 * 256)
  assert flops == {"convolution models/discriminator.py": conv, "dot (other)": 2 * 8 * 16 * 4}
  assert "TFLOP" in hlo_breakdown.format_breakdown({"flops": flops, "collective_bytes": {}})
