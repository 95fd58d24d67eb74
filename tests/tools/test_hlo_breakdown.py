"""psvae_jax.tools.hlo_breakdown: dot/convolution FLOPs per source file of a compiled step."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.models import discriminator
from psvae_jax.tools import hlo_breakdown


def _valid_taps(size, window, stride, padding, lhs_dilation=1):
  """Sum over output positions of the kernel taps that meet real input: the convolution of an
  all-ones input with an all-ones kernel, computed by XLA itself."""
  ones = jnp.ones((1, size, size, 1))
  counts = jax.lax.conv_general_dilated(
      ones, jnp.ones((window, window, 1, 1)), (stride, stride), [padding, padding],
      lhs_dilation=(lhs_dilation, lhs_dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return float(np.asarray(counts).sum())


def test_dot_and_conv_flops_are_exact_and_attributed():
  d = discriminator.NLayerDiscriminator(ndf=8, n_layers=1, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(d)

  def f(state, images, x, w):
    return nnx.merge(graphdef, state)(images).sum() + jnp.dot(x, w).sum()

  compiled = jax.jit(f).lower(state, jnp.ones((2, 16, 16, 3)), jnp.ones((8, 16)),
                              jnp.ones((16, 4))).compile()
  flops = hlo_breakdown.breakdown(compiled.as_text())["flops"]
  # conv_in 4x4/2 3->8 on 16x16 -> 8x8; conv 4x4/1 8->16 -> 7x7; conv_out 4x4/1 16->1 -> 6x6,
  # all padded by 1: the padding taps are not counted.
  conv = 2 * 2 * (_valid_taps(16, 4, 2, (1, 1)) * 3 * 8 + _valid_taps(8, 4, 1, (1, 1)) * 8 * 16
                  + _valid_taps(7, 4, 1, (1, 1)) * 16 * 1)
  assert flops == {"convolution models/discriminator.py": conv, "dot (other)": 2 * 8 * 16 * 4}
  assert "TFLOP" in hlo_breakdown.format_breakdown({"flops": flops, "collective_bytes": {}})


def test_input_dilation_holes_are_not_counted():
  # The form the TPU compiler gives batched matmuls: a window as large as the input dilation,
  # so each output element meets one real input element per spatial dimension.
  def f(x, w):
    return jax.lax.conv_general_dilated(x, w, (3, 3), [(0, 0), (0, 0)], lhs_dilation=(4, 4),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  x, w = jnp.ones((2, 4, 4, 16)), jnp.ones((4, 4, 16, 8))
  text = jax.jit(f).lower(x, w).compile().as_text()
  flops = sum(hlo_breakdown.breakdown(text)["flops"].values())
  out = f(x, w)
  taps = _valid_taps(4, 4, 3, (0, 0), lhs_dilation=4)
  assert flops == 2 * 2 * taps * 16 * 8
  assert flops < 2 * out.size * 16 * 16  # the whole window (4 x 4 taps) would count 16x this


def test_traffic_counts_what_each_top_level_instruction_reads_and_writes():
  def f(x, w):
    return jnp.tanh(x @ w) * 2.0  # one dot (+ elementwise tail): x, w in, the result out

  x, w = jnp.ones((64, 32)), jnp.ones((32, 16))
  result = hlo_breakdown.breakdown(jax.jit(f).lower(x, w).compile().as_text())
  traffic = sum(result["bytes"].values())
  # At least the inputs and the output once each (4 bytes a float); at most a few passes more.
  floor = 4 * (64 * 32 + 32 * 16 + 64 * 16)
  assert floor <= traffic <= 4 * floor, (traffic, floor)
  assert "HBM traffic" in hlo_breakdown.format_breakdown(result)


def test_loop_bodies_count_as_often_as_they_run():
  def f(x, w):
    return jax.lax.fori_loop(0, 10, lambda i, c: jnp.tanh(c @ w), x)

  x, w = jnp.ones((64, 32)), jnp.ones((32, 32))
  result = hlo_breakdown.breakdown(jax.jit(f).lower(x, w).compile().as_text())
  one = 2 * 64 * 32 * 32
  assert sum(result["flops"].values()) == 10 * one
  assert result["loops"] == {"count": 1, "flops_in_bodies_once": one,
                             "flops_in_bodies_run": 10 * one}


# The shape of the TPU compiler's windowed-einsum loops: the counter starts at 1 and steps by 2.
_STEPPED_LOOP = """HloModule m

%body (p: (f32[8,8], u32[])) -> (f32[8,8], u32[]) {
  %p = (f32[8,8], u32[]) parameter(0)
  %x = f32[8,8] get-tuple-element(%p), index=0
  %i = u32[] get-tuple-element(%p), index=1
  %dot = f32[8,8] dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = u32[] constant(2)
  %next = u32[] add(%i, %two)
  ROOT %t = (f32[8,8], u32[]) tuple(%dot, %next)
}

%cond (q: (f32[8,8], u32[])) -> pred[] {
  %q = (f32[8,8], u32[]) parameter(0)
  %limit = u32[] constant(8)
  %j = u32[] get-tuple-element(%q), index=1
  ROOT %lt = pred[] compare(%j, %limit), direction=LT
}

ENTRY %main (a: f32[8,8]) -> (f32[8,8], u32[]) {
  %a = f32[8,8] parameter(0)
  %one = u32[] constant(1)
  %init = (f32[8,8], u32[]) tuple(%a, %one)
  ROOT %w = (f32[8,8], u32[]) while(%init), condition=%cond, body=%body
}
"""


def test_trip_count_follows_the_counter_start_and_step():
  result = hlo_breakdown.breakdown(_STEPPED_LOOP)
  assert result["loops"]["count"] == 1
  assert sum(result["flops"].values()) == 4 * 2 * 8 * 8 * 8  # i = 1, 3, 5, 7


_ASYNC_COPY = """HloModule m

ENTRY %main (a: f32[256,256]) -> f32[256,256] {
  %a = f32[256,256] parameter(0)
  %start = (f32[256,256], f32[256,256], u32[]) copy-start(%a)
  %done = f32[256,256] copy-done(%start)
  ROOT %neg = f32[256,256] negate(%done)
}
"""


def test_an_async_copy_counts_once():
  # The copy reads and writes the array once (2 x 256 KiB); the negate reads and writes it too.
  array = 4 * 256 * 256
  assert hlo_breakdown.breakdown(_ASYNC_COPY)["bytes"] == {"(other)": 2 * array + 2 * array}
