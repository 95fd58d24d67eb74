"""PixelDecoder: kl-f16 shapes, remat / bf16 / last-layer-kernel paths agree with the plain one.

Parity with diffusers' AutoencoderKL decoder is in tests/ports/test_diffusers_vae.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import psvae_jax  # noqa: F401
from psvae_jax.models.pixel_decoder import PixelDecoder


def _random_state(abstract: nnx.Module, seed: int) -> nnx.State:
  """Random float32 parameters for an abstract module (no per-shape init compiles)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    shape, name = leaf.shape, str(path[-2].key)  # (..., DictKey(name), GetAttrKey("value"))
    if name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name == "bias":
      value = 0.1 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, nnx.state(abstract))


def _small(seed=0, **kw):
  args = dict(z_channels=8, out_ch=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
              attn_resolutions=(8,), resolution=16)
  args.update(kw)
  abstract = nnx.eval_shape(lambda: PixelDecoder(**args, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return graphdef, _random_state(abstract, seed)


def test_kl_f16_default_shape():
  abstract = nnx.eval_shape(lambda: PixelDecoder(rngs=nnx.Rngs(0)))
  out = jax.eval_shape(lambda m, z: m(z), abstract,
                       jax.ShapeDtypeStruct((2, 16, 16, 96), jnp.float32))
  assert out.shape == (2, 256, 256, 3) and out.dtype == jnp.float32
  assert len(abstract.up_blocks) == 5
  # Attention only in the first (16x16) up block; every up block has num_res_blocks + 1 = 3.
  assert [b.attentions is not None for b in abstract.up_blocks] == [True] + [False] * 4
  assert all(len(b.resnets) == 3 for b in abstract.up_blocks)
  assert [b.upsampler is not None for b in abstract.up_blocks] == [True] * 4 + [False]
  assert abstract.mid_block.attention is not None and abstract.post_quant_conv is None
  kernel = abstract.conv_in.kernel
  assert kernel.shape == (3, 3, 96, 512)
  assert tuple(kernel.get_metadata()["out_sharding"]) == (None, None, None, "conv_out")


def test_two_level_forward_and_substitute_kernel():
  graphdef, state = _small()
  model = nnx.merge(graphdef, state)
  z = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 8)), jnp.float32)

  def both(m, x):
    return m(x), m.output_from_features(m.decode_features(x), m.conv_out.kernel[...])

  out, via_kernel = jax.jit(both)(model, z)
  assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(via_kernel), np.asarray(out), atol=1e-5)


# One level (no upsampler): keeps the backward-pass compiles cheap on CPU.
TINY = dict(ch_mult=(1,), num_res_blocks=0, resolution=8)


def test_remat_matches_plain_gradients_and_bf16_is_close():
  graphdef, state = _small(**TINY)
  graphdef_remat, _ = _small(remat=True, **TINY)
  graphdef_bf16, _ = _small(dtype=jnp.bfloat16, **TINY)
  z = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 8)), jnp.float32)

  def value_and_grad(m):
    return nnx.value_and_grad(lambda m: jnp.mean(m(z) ** 2))(m)

  loss, grads = jax.jit(value_and_grad)(nnx.merge(graphdef, state))
  loss_remat, grads_remat = jax.jit(value_and_grad)(nnx.merge(graphdef_remat, state))
  np.testing.assert_allclose(float(loss_remat), float(loss), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-4)

  out = jax.jit(lambda m, x: m(x))(nnx.merge(graphdef, state), z)
  out_bf16 = jax.jit(lambda m, x: m(x))(nnx.merge(graphdef_bf16, state), z)
  assert out_bf16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out_bf16 - out) / jnp.linalg.norm(out))
  assert rel < 5e-2, rel


def test_post_quant_conv_and_no_mid_attention():
  graphdef, state = _small(use_post_quant_conv=True, mid_attention=False, attn_resolutions=())
  model = nnx.merge(graphdef, state)
  assert model.post_quant_conv.kernel.shape == (1, 1, 8, 8)
  assert model.mid_block.attention is None
  out = jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 4, 4, 8), jnp.float32))
  assert out.shape == (1, 8, 8, 3)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="attn_resolutions"):
    nnx.eval_shape(lambda: PixelDecoder(attn_resolutions=(24,), rngs=nnx.Rngs(0)))
  graphdef, state = _small()
  with pytest.raises(ValueError, match="8 channels"):
    nnx.merge(graphdef, state)(jnp.zeros((1, 4, 4, 96)))
