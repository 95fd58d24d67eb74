"""ViT pieces: torch-compatible bicubic resizing, the transformer block and stack (scanned ==
unrolled, remat, bf16), encoder presets and the RAE feature grid, the text encoder presets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psvae_jax.models.encoders import PRESETS, build_encoder, preprocess_pixels, rae_features
from psvae_jax.models.resize import resize_bicubic
from psvae_jax.models.text_encoder import build_text_encoder
from psvae_jax.models.vit import TransformerBlock, TransformerStack, swiglu_hidden_dim


def _build(make, seed=0):
  """`make()`'s module with parameters drawn on the host: random init in JAX compiles a PRNG
  program per parameter shape, which dominates these small tests on a busy CPU."""
  module = nnx.eval_shape(make)
  rng = np.random.default_rng(seed)
  for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    shape = variable.get_value().shape
    value = rng.standard_normal(shape) * 0.1
    if path[-1] in ("scale", "gamma"):
      value = value + 1.0
    variable.set_value(jnp.asarray(value, jnp.float32))
  return module


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matches_torch(antialias):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  for in_hw, out_hw in (((37, 37), (16, 16)), ((16, 16), (37, 37)), ((37, 37), (16, 24)),
                        ((5, 7), (9, 3)), ((8, 8), (8, 8))):
    x = rng.standard_normal((2,) + in_hw + (5,)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="bicubic",
        align_corners=False, antialias=antialias).permute(0, 2, 3, 1).numpy()
    out = np.asarray(resize_bicubic(jnp.asarray(x), out_hw, antialias=antialias))
    assert np.abs(out - ref).max() <= 2e-5, (in_hw, out_hw)


def test_swiglu_width_matches_dinov2_g():
  assert swiglu_hidden_dim(1536, 4) == 4096  # DINOv2-g/14 SwiGLUFFNFused
  assert swiglu_hidden_dim(32, 4) == 88
  assert PRESETS["dinov2_g14"].mlp_dim == 4096


@pytest.mark.parametrize("mlp_type", ["gelu", "gelu_tanh", "swiglu"])
def test_block_shapes_and_logical_names(mlp_type):
  block = _build(lambda: TransformerBlock(32, 4, 64, layer_scale_init=0.5, mlp_type=mlp_type,
                                          rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(0), (2, 7, 32))
  assert block(x).shape == (2, 7, 32)
  names = {".".join(map(str, p)): v.get_metadata().get("out_sharding")
           for p, v in nnx.to_flat_state(nnx.state(block, nnx.Param))}
  assert names["attn.qkv.kernel"] == ("embed", None, "heads")
  assert names["attn.out.kernel"] == ("heads", "embed")
  first = "mlp.gate.kernel" if mlp_type == "swiglu" else "mlp.fc1.kernel"
  assert names[first] == ("embed", "mlp")
  assert all(n is not None for n in names.values())
  no_ls = TransformerBlock(32, 4, 64, layer_scale_init=None, rngs=nnx.Rngs(0))  # JAX init
  assert no_ls.ls1 is None and no_ls(x).shape == x.shape


def _copy_into_scanned(unrolled, scanned, depth):
  source = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(unrolled, nnx.Param))}
  for path, variable in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
    variable.set_value(jnp.stack([source[(path[0], i) + path[1:]] for i in range(depth)]))


def test_scanned_stack_equals_unrolled_and_differentiates():
  kw = dict(layer_scale_init=0.3, mlp_type="swiglu")
  unrolled = _build(lambda: TransformerStack(3, 32, 4, 64, rngs=nnx.Rngs(0), **kw))
  scanned = _build(lambda: TransformerStack(3, 32, 4, 64, scan_layers=True, remat=True,
                                            rngs=nnx.Rngs(1), **kw))
  kernel = nnx.state(scanned, nnx.Param)["blocks"]["attn"]["qkv"]["kernel"]
  assert kernel.get_value().shape == (3, 32, 3, 32)
  assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", None, "heads")
  _copy_into_scanned(unrolled, scanned, 3)
  x = jax.random.normal(jax.random.key(0), (2, 7, 32))
  mask = jnp.ones((2, 1, 7, 7), bool).at[1, ..., 5:].set(False)

  def run(module, x):
    graphdef, state = nnx.split(module)
    loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x, mask) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=1))(state, x)

  (a, ga), (b, gb) = run(unrolled, x), run(scanned, x)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), atol=1e-4)


def test_bf16_compute_float32_params():
  f32 = _build(lambda: TransformerStack(2, 32, 4, 64, layer_scale_init=1.0, rngs=nnx.Rngs(0)))
  bf16 = _build(lambda: TransformerStack(2, 32, 4, 64, layer_scale_init=1.0, dtype=jnp.bfloat16,
                                         rngs=nnx.Rngs(0)))
  assert all(v.get_value().dtype == jnp.float32
             for _, v in nnx.to_flat_state(nnx.state(bf16, nnx.Param)))
  x = jax.random.normal(jax.random.key(0), (2, 7, 32))
  a, b = nnx.jit(lambda m, x: m(x))(f32, x), nnx.jit(lambda m, x: m(x))(bf16, x)
  assert b.dtype == jnp.bfloat16 and bool(jnp.isfinite(b).all())
  assert float(jnp.abs(a - b.astype(jnp.float32)).max()) < 0.1 * float(jnp.abs(a).max())


def test_tiny_encoder_rae_grid_and_properties():
  encoder = _build(lambda: build_encoder("dinov2_tiny_reg", rngs=nnx.Rngs(0)))
  assert (encoder.width, encoder.patch_size, encoder.num_prefix_tokens) == (64, 14, 5)
  assert encoder.grid_size(224) == (16, 16)
  images = jax.random.randint(jax.random.key(0), (2, 256, 256, 3), 0, 256).astype(jnp.uint8)
  x = preprocess_pixels(images, 224, mean=encoder.image_mean, std=encoder.image_std)
  feats = nnx.jit(rae_features)(encoder, x)
  assert feats.shape == (2, 16, 16, 64)
  np.testing.assert_allclose(np.asarray(feats.mean(-1)), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(feats.std(-1)), 1.0, atol=1e-3)
  siglip = _build(lambda: build_encoder("siglip_tiny", rngs=nnx.Rngs(0), scan_layers=True))
  assert siglip.num_prefix_tokens == 0 and siglip.image_mean == (0.5, 0.5, 0.5)
  assert nnx.jit(rae_features)(siglip, x).shape == (2, 16, 16, 64)
  with pytest.raises(ValueError, match="unknown encoder preset"):
    build_encoder("dinov3", rngs=nnx.Rngs(0))


def test_real_preset_shapes_abstract():
  """Real shapes without allocating them: DINOv2-B/14 with registers (RAE's encoder)."""
  encoder = nnx.eval_shape(lambda: build_encoder("dinov2_b14_reg", rngs=nnx.Rngs(0)))
  assert encoder.pos_embed.get_value().shape == (1 + 37 * 37, 768)
  assert encoder.register_tokens.get_value().shape == (4, 768)
  graphdef, state = nnx.split(encoder)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert out.shape == (1, 5 + 256, 768)


@pytest.mark.slow
def test_real_siglip_and_qwen_shapes_abstract():
  siglip = nnx.eval_shape(lambda: build_encoder("siglip2_so400m14", rngs=nnx.Rngs(0)))
  assert siglip.pos_embed.get_value().shape == (256, 1152)
  qwen = nnx.eval_shape(lambda: build_text_encoder("qwen2.5-0.5b", rngs=nnx.Rngs(0)))
  assert qwen.layers[0].k.kernel.get_value().shape == (896, 128)
  assert sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(qwen, nnx.Param))) \
      == 494_032_768  # Qwen2.5-0.5B (tied embeddings)


def test_tiny_text_encoder_scanned_equals_unrolled():
  unrolled = _build(lambda: build_text_encoder("tiny", rngs=nnx.Rngs(0)))
  scanned = _build(lambda: build_text_encoder("tiny", rngs=nnx.Rngs(1), scan_layers=True))
  source = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(unrolled, nnx.Param))}
  for path, variable in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
    if path[0] == "layers":
      variable.set_value(jnp.stack([source[("layers", i) + path[1:]] for i in range(2)]))
    else:
      variable.set_value(source[path])
  ids = jnp.arange(20).reshape(2, 10)
  mask = jnp.ones((2, 10), jnp.int32).at[1, 6:].set(0)
  a = nnx.jit(lambda m, i, k: m(i, k))(unrolled, ids, mask)
  b = nnx.jit(lambda m, i, k: m(i, k))(scanned, ids, mask)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
