"""MMDiT: shapes, zero init, masks, editing tokens, scan/remat equivalence, bf16.

Models are tiny and compiled with XLA's backend optimisations off (compile time dominates);
calls share signatures (e.g. an all-True mask instead of none) so compilations are reused.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psvae_jax.models import mmdit
from psvae_jax.models.ddt_head import DDTHeadConfig
from psvae_jax.tree_paths import path_str

SMALL = mmdit.MMDiTConfig(num_layers=2, num_heads=2, head_dim=8, in_channels=4, patch_size=2,
                          sample_size=8, pos_embed_max_size=8, text_dim=12, pooled_dim=10,
                          qk_norm="rms_norm")
HEAD = DDTHeadConfig(width=32, depth=2, num_heads=2)
FAST_COMPILE = {"xla_backend_optimization_level": 0}
ALL_TEXT = jnp.ones((2, 5), bool)


def randomize(model, seed=0, std=0.1):
  """Sets every parameter to N(0, std^2) noise (norm scales to 1 + noise), drawn with numpy
  (no per-shape compilation), so zero-initialised paths become active."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = std * rng.standard_normal(var.get_value().shape)
    if str(getattr(path[-1], "key", path[-1])) == "scale":
      value += 1.0
    var.set_value(jnp.asarray(value, jnp.float32))
  return model


@functools.partial(jax.jit, static_argnums=(0, 1, 2), compiler_options=FAST_COMPILE)
def _init_state(config, seed, kwargs):
  return nnx.state(mmdit.MMDiT(config, rngs=nnx.Rngs(seed), **dict(kwargs)))


def build(config=SMALL, seed=0, randomized=True, std=0.1, **kwargs):
  """An MMDiT with random parameters, or its own initialisation (compiled, not op by op)."""
  abstract = nnx.eval_shape(lambda: mmdit.MMDiT(config, rngs=nnx.Rngs(seed), **kwargs))
  if randomized:
    return randomize(abstract, seed, std)
  graph, _ = nnx.split(abstract)
  return nnx.merge(graph, _init_state(config, seed, tuple(sorted(kwargs.items()))))


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def _apply(graph, method, state, args, kwargs):
  return getattr(nnx.merge(graph, state), method)(*args, **kwargs)


def run(model, *args, method="__call__", **kwargs):
  """model(*args, **kwargs), compiled once per model structure and input signature."""
  graph, state = nnx.split(model)
  return _apply(graph, method, state, args, kwargs)


def max_err(a, b):
  return float(jnp.abs(a - b).max())


def assert_close(a, b, rel=1e-5):
  """max |a - b| <= rel * max |b| (outputs of random models have arbitrary scale)."""
  scale = float(jnp.abs(b).max())
  assert max_err(a, b) <= rel * scale + 1e-6, f"max abs err {max_err(a, b)} vs scale {scale}"


def inputs(batch=2, size=8, text_len=5, seed=1, config=SMALL):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (batch, size, size, config.in_channels)),
          jax.random.normal(ks[1], (batch, text_len, config.text_dim)),
          jax.random.normal(ks[2], (batch, config.pooled_dim)),
          jnp.linspace(100.0, 900.0, batch))


@pytest.mark.parametrize("head", [None, HEAD])
def test_shapes_and_zero_init(head):
  # One (context-pre-only) block keeps the compiled initialisation small.
  model = build(dataclasses.replace(SMALL, num_layers=1, ddt_head=head), randomized=False)
  x, text, pooled, t = inputs()
  out = run(model, x, text, pooled, t, text_mask=ALL_TEXT)
  assert out.shape == x.shape and out.dtype == jnp.float32
  # adaLN-Zero and a zero output layer: the fresh model predicts exactly 0 ...
  np.testing.assert_array_equal(out, 0.0)
  # ... and only the output layer is zero: setting it makes the output depend on the input.
  layer = model.proj_out if head is None else model.ddt_head.final_linear
  kernel = np.random.default_rng(0).standard_normal(layer.kernel[...].shape)
  layer.kernel.set_value(jnp.asarray(kernel, jnp.float32))
  out = run(model, x, text, pooled, t, text_mask=ALL_TEXT)
  assert max_err(out[0], out[1]) > 1e-3
  if head is None:  # a patch-2 model on a non-square latent
    assert run(model, x[:, :, :6], text, pooled, t, text_mask=ALL_TEXT).shape == (2, 8, 6, 4)


def test_presets_and_param_counts():
  tiny = mmdit.mmdit_preset("tiny", in_channels=8)
  assert tiny.in_channels == 8 and tiny.ddt_head is not None
  abstract = nnx.eval_shape(lambda: mmdit.MMDiT(tiny, rngs=nnx.Rngs(0)))
  assert mmdit.param_count(tiny) == sum(
      x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  base = mmdit.mmdit_preset("base")
  assert base.ddt_head == DDTHeadConfig() and base.patch_size == 1 and base.in_channels == 96
  with pytest.raises(ValueError, match="unknown MMDiT preset"):
    mmdit.mmdit_preset("huge")


@pytest.mark.slow
def test_paper_preset_sizes():
  assert 600e6 < mmdit.param_count(mmdit.mmdit_preset("base")) < 700e6
  assert 1.6e9 < mmdit.param_count(mmdit.mmdit_preset("large")) < 1.8e9


def test_padded_text_tokens_do_not_change_the_output():
  model = build()
  x, text, pooled, t = inputs(text_len=5)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  out = run(model, x, text, pooled, t, text_mask=mask)
  garbage = text.at[0, 3:].set(100.0)
  assert_close(run(model, x, garbage, pooled, t, text_mask=mask), out)
  assert_close(run(model, x[:1], text[:1, :3], pooled[:1], t[:1], text_mask=ALL_TEXT[:1, :3]),
               out[:1])
  # Unmasked, the padded tokens do matter.
  assert max_err(run(model, x, garbage, pooled, t, text_mask=ALL_TEXT)[0], out[0]) > 1e-3


def test_causal_text_mask():
  mask = mmdit.joint_attention_mask(3, 2, causal_text=True)
  want = np.array([[1, 0, 0, 1, 1], [1, 1, 0, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1],
                   [1, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(mask.dense()[0, 0], want)
  # In a joint block, text token i never sees later text tokens.
  block = randomize(nnx.eval_shape(lambda: mmdit.JointBlock(16, 2, 64, qk_norm="rms_norm",
                                                            rngs=nnx.Rngs(0))), std=0.3)
  ks = jax.random.split(jax.random.key(0), 4)
  txt, img = jax.random.normal(ks[0], (1, 3, 16)), jax.random.normal(ks[1], (1, 4, 16))
  cond = jax.random.normal(ks[2], (1, 16))
  changed = txt.at[0, 2].set(jax.random.normal(ks[3], (16,)))
  causal = mmdit.joint_attention_mask(3, 4, causal_text=True)
  full = jnp.ones(causal.shape, bool)
  assert_close(run(block, changed, img, cond, causal)[0][:, :2],
               run(block, txt, img, cond, causal)[0][:, :2])
  assert max_err(run(block, changed, img, cond, full)[0][:, :2],
                 run(block, txt, img, cond, full)[0][:, :2]) > 1e-4
  # The model option is wired, and combines with padding.
  causal_model = build(dataclasses.replace(SMALL, causal_text=True), std=0.3)
  x, text, pooled, t = inputs()
  pad = jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
  out = run(causal_model, x, text, pooled, t, text_mask=pad)
  assert max_err(out, run(build(std=0.3), x, text, pooled, t, text_mask=pad)) > 1e-3
  assert_close(run(causal_model, x, text.at[0, 4].set(9.0), pooled, t, text_mask=pad), out)


@pytest.mark.parametrize("edit_position_std", [0.0, 0.5])
def test_edit_source_tokens(edit_position_std):
  model = build(dataclasses.replace(SMALL, edit=True, ddt_head=HEAD,
                                    edit_position_std=edit_position_std))
  x, text, pooled, t = inputs()
  source = jax.random.normal(jax.random.key(7), (2, 12, 12, 4))  # its own 6x6 patch grid
  present = jnp.ones((2,), bool)
  call = lambda src, mask: run(model, x, text, pooled, t, text_mask=ALL_TEXT,
                               source_latents=src, source_mask=mask)
  out = call(source, present)
  assert out.shape == x.shape  # the target tokens only
  assert max_err(call(source.at[:, :4].multiply(-1.0), present), out) > 1e-4
  # A hidden source is the same as no source: the T2I path of an editing model.
  plain = run(model, x, text, pooled, t, text_mask=ALL_TEXT)
  hidden = call(source, jnp.array([False, True]))
  assert_close(hidden[0], plain[0])
  assert_close(hidden[1], out[1])
  # With the source equal to the target, only the learned source embedding separates them.
  same = call(source[:, :8, :8], present)
  model.source_embedding.set_value(jnp.zeros_like(model.source_embedding[...]))
  assert max_err(call(source[:, :8, :8], present), same) > 1e-4
  with pytest.raises(ValueError, match="config.edit=False"):
    nnx.eval_shape(lambda: build()(x, text, pooled, t, source_latents=source))


def test_edit_position_codes_are_shared_by_target_and_source_cells():
  config = dataclasses.replace(SMALL, edit=True, edit_position_std=0.5)
  model = build(config, randomized=False)
  assert build(dataclasses.replace(config, edit_position_std=0.0)).edit_positions is None
  table = model.edit_positions[...]
  assert table.shape == (config.pos_grid ** 2, config.width)
  assert 0.4 < float(jnp.std(table)) < 0.6  # drawn from N(0, 0.5^2)
  # Target and source tokens of one cell get the same code: with the source embedding at 0,
  # equal latents embed to equal tokens, and the codes differ between cells.
  model.source_embedding.set_value(jnp.zeros_like(model.source_embedding[...]))
  x = jax.random.normal(jax.random.key(3), (1, 8, 8, 4))
  with_codes = model._embed_image(x, (4, 4))
  model.edit_positions.set_value(jnp.zeros_like(table))
  codes = with_codes - model._embed_image(x, (4, 4))
  np.testing.assert_allclose(codes[0], mmdit.crop_pos_grid(table, config.pos_grid, 4, 4),
                             atol=1e-6)
  distances = jnp.linalg.norm(codes[0][:, None] - codes[0][None], axis=-1)
  assert float(jnp.min(distances + 1e3 * jnp.eye(16))) > 0.5  # every cell its own code


def _flat_params(model):
  return {path_str(path): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _scanned_pair():
  config = dataclasses.replace(SMALL, num_layers=4, dual_attention_layers=(0,), edit=True)
  model = build(config)
  scanned = build(config, scan_layers=True, remat_policy="dots")
  assert len(scanned.block_groups) == 2  # runs: dual block 0, plain blocks 1-2
  stacked = mmdit.to_scanned_params(
      {k: np.asarray(v.get_value()) for k, v in _flat_params(model).items()}, config)
  scanned_params = _flat_params(scanned)
  assert set(stacked) == set(scanned_params)
  for name, var in scanned_params.items():
    var.set_value(jnp.asarray(stacked[name]))
  x, text, pooled, t = inputs()
  kw = dict(text_mask=jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool), source_latents=x)
  return model, scanned, (x, text, pooled, t), kw


def test_scan_matches_unrolled():
  model, scanned, args, kw = _scanned_pair()
  assert_close(run(scanned, *args, **kw), run(model, *args, **kw))


@pytest.mark.slow
def test_scan_and_remat_gradients_match_unrolled():
  model, scanned, args, kw = _scanned_pair()

  def grads(m):
    graph, params, rest = nnx.split(m, nnx.Param, ...)
    loss = lambda p: jnp.mean(nnx.merge(graph, p, rest)(*args, **kw) ** 2)
    return jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)

  g_plain, g_scan = grads(model), grads(scanned)
  assert_close(g_scan["block_groups"][1]["img_qkv"]["kernel"][...][1],
               g_plain["blocks"][2]["img_qkv"]["kernel"][...], rel=1e-4)
  assert_close(g_scan["patch_embed"]["kernel"][...], g_plain["patch_embed"]["kernel"][...],
               rel=1e-4)


def test_bfloat16_compute():
  f32, bf16 = build(), build(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  x, text, pooled, t = inputs()
  a = run(f32, x, text, pooled, t, text_mask=ALL_TEXT)
  b = run(bf16, x, text, pooled, t, text_mask=ALL_TEXT)
  assert b.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(b)))
  assert_close(b, a, rel=0.05)


def test_learned_positions_and_velocity_helper():
  model = build(dataclasses.replace(SMALL, pos_embed="learned", pos_embed_max_size=None))
  assert model.pos_embed[...].shape == (16, 16)
  x, text, pooled, t = inputs()
  assert_close(run(model, x, t / 1000, text, pooled, method="velocity"),
               run(model, x, text, pooled, t), rel=1e-4)
  with pytest.raises(ValueError, match="larger than the position grid"):
    nnx.eval_shape(lambda: model(jnp.zeros((1, 10, 10, 4)), text[:1], pooled[:1], t[:1]))


def test_sincos_table_matches_sd3_layout():
  table = mmdit.sincos_pos_embed_2d(8, 2, 3, base_size=2)
  # Column index in the first half, row index in the second; [sin, cos] per half.
  row, col = 1, 2
  col_pos, row_pos = col * 2 / 3, row * 2 / 2
  omega = 1.0 / 10000 ** (np.arange(2) / 2)
  want = np.concatenate([np.sin(col_pos * omega), np.cos(col_pos * omega),
                         np.sin(row_pos * omega), np.cos(row_pos * omega)])
  np.testing.assert_allclose(table[row * 3 + col], want, atol=1e-6)
  pooled = mmdit.mean_pool(jnp.arange(6.0).reshape(1, 3, 2), jnp.array([[1, 1, 0]]))
  np.testing.assert_allclose(pooled, [[1.0, 2.0]])
