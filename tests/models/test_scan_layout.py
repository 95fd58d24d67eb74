"""match_scan_layout: unscanned parameters (the ports' layout) into scanned models and back,
with loss and gradients of the scanned model equal to the unscanned one, for each network that
scans its layers; converted weights loaded into a scanned encoder; loud errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax.models import encoders, mmdit, text_encoder
from psvae_jax.models.ddt_head import DDTHeadConfig
from psvae_jax.models.scan_layout import ScanLayoutError, match_scan_layout
from psvae_jax.ports.converted import save_converted
from psvae_jax.tasks import autoencoder_parts

FAST_COMPILE = {"xla_backend_optimization_level": 0}
TINY_VIT = dataclasses.replace(encoders.PRESETS["tiny"], depth=3, image_size=28)
TINY_TEXT = dataclasses.replace(text_encoder.PRESETS["tiny"], depth=3,
                                layer_types=("full_attention",) * 3)
TINY_MMDIT = mmdit.MMDiTConfig(num_layers=4, num_heads=2, head_dim=8, in_channels=4, patch_size=2,
                               sample_size=8, pos_embed_max_size=8, text_dim=12, pooled_dim=10,
                               dual_attention_layers=(0,),
                               ddt_head=DDTHeadConfig(width=32, depth=2, num_heads=2))


def _vit(scan):
  return encoders.VisionEncoder(TINY_VIT, scan_layers=scan, rngs=nnx.Rngs(0))


def _text(scan):
  return text_encoder.TextEncoder(TINY_TEXT, scan_layers=scan, rngs=nnx.Rngs(0))


def _mmdit(scan):
  return mmdit.MMDiT(TINY_MMDIT, scan_layers=scan, rngs=nnx.Rngs(0))


def _vit_loss(model):
  pixels = jax.random.normal(jax.random.key(1), (2, 28, 28, 3))
  return jnp.mean(model(pixels) ** 2)


def _text_loss(model):
  ids = jax.random.randint(jax.random.key(1), (2, 6), 0, TINY_TEXT.vocab_size)
  mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
  return jnp.mean(model(ids, mask)[:, :4] ** 2)


def _mmdit_loss(model):
  keys = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(keys[0], (2, 8, 8, 4))
  text = jax.random.normal(keys[1], (2, 5, 12))
  pooled = jax.random.normal(keys[2], (2, 10))
  out = model(x, text, pooled, jnp.array([100.0, 700.0]),
              text_mask=jnp.array([[1, 1, 1, 0, 0], [1] * 5], bool))
  return jnp.mean((out - x) ** 2)


def _loss_and_grads(model, loss_fn):
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  fn = lambda p: loss_fn(nnx.merge(graph, p, rest))
  loss, grads = jax.jit(jax.value_and_grad(fn), compiler_options=FAST_COMPILE)(params)
  return loss, grads.to_pure_dict()


def _assert_trees_equal(a, b, atol=0.0):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert [p for p, _ in flat_a] == list(flat_b)
  worst = max(float(np.max(np.abs(np.asarray(x) - np.asarray(flat_b[p])))) for p, x in flat_a)
  assert worst <= atol, worst
  return worst


@pytest.mark.parametrize("build,loss_fn", [
    (_vit, _vit_loss), (_text, _text_loss),
    pytest.param(_mmdit, _mmdit_loss, marks=pytest.mark.slow)],
                         ids=["vit", "text_encoder", "mmdit_ddt_head"])
def test_unscanned_params_into_scanned_model_same_loss_and_grads(build, loss_fn):
  plain, scanned = build(False), build(True)
  plain_params = nnx.state(plain, nnx.Param).to_pure_dict()
  stacked = match_scan_layout(plain_params, nnx.state(scanned, nnx.Param))
  nnx.update(scanned, stacked)
  # And back: the exact unscanned tree.
  _assert_trees_equal(match_scan_layout(stacked, plain_params), plain_params)

  loss_plain, grads_plain = _loss_and_grads(plain, loss_fn)
  loss_scan, grads_scan = _loss_and_grads(scanned, loss_fn)
  np.testing.assert_allclose(float(loss_scan), float(loss_plain), rtol=1e-5)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads_plain))
  _assert_trees_equal(match_scan_layout(grads_scan, grads_plain), grads_plain,
                      atol=1e-5 * scale)


def test_mmdit_groups_follow_runs_of_equal_blocks():
  plain = nnx.eval_shape(lambda: _mmdit(False))
  scanned = nnx.eval_shape(lambda: _mmdit(True))
  like = nnx.state(scanned, nnx.Param).to_pure_dict()
  values = jax.tree.map(lambda x: jnp.full(x.shape, 0.0), nnx.state(plain, nnx.Param).to_pure_dict())
  for i in range(3):
    values["blocks"][i]["img_out"]["kernel"] = jnp.full((16, 16), float(i))
  stacked = match_scan_layout(values, like)
  assert sorted(stacked["block_groups"]) == [0, 1]  # the dual block 0, plain blocks 1-2
  np.testing.assert_array_equal(stacked["block_groups"][1]["img_out"]["kernel"][:, 0, 0], [1, 2])
  np.testing.assert_array_equal(stacked["ddt_head"]["blocks"]["out"]["kernel"].shape[0], 2)


def test_mismatch_names_the_path():
  plain = nnx.state(nnx.eval_shape(lambda: _vit(False)), nnx.Param).to_pure_dict()
  deeper = dataclasses.replace(TINY_VIT, depth=4)
  like = nnx.state(nnx.eval_shape(lambda: encoders.VisionEncoder(
      deeper, scan_layers=True, rngs=nnx.Rngs(0))), nnx.Param).to_pure_dict()
  with pytest.raises(ScanLayoutError, match=r"blocks\.blocks: 3 layers but the model stacks 4"):
    match_scan_layout(plain, like)
  del plain["norm"]
  same_depth = nnx.state(nnx.eval_shape(lambda: _vit(True)), nnx.Param).to_pure_dict()
  with pytest.raises(ScanLayoutError, match="missing norm"):
    match_scan_layout(plain, same_depth)


def test_converted_encoder_loads_into_scanned_encoder(tmp_path):
  plain = _vit(False)
  save_converted(plain, str(tmp_path), model_type="dinov2_with_registers")
  scanned = nnx.eval_shape(lambda: _vit(True))
  target = jax.tree.map(jnp.zeros_like, nnx.state(scanned, nnx.Param))
  params = autoencoder_parts.load_encoder_init(nnx.State({"encoder": target}), str(tmp_path),
                                               prefix="encoder")
  loaded = params["encoder"].to_pure_dict()
  _assert_trees_equal(match_scan_layout(loaded, nnx.state(plain, nnx.Param)),
                      nnx.state(plain, nnx.Param).to_pure_dict())
  # A converted encoder of another depth is refused, naming the stack.
  other = nnx.eval_shape(lambda: encoders.VisionEncoder(
      dataclasses.replace(TINY_VIT, depth=2), scan_layers=True, rngs=nnx.Rngs(0)))
  wrong = jax.tree.map(jnp.zeros_like, nnx.state(other, nnx.Param))
  with pytest.raises(ckpt_lib.CheckpointError, match="3 layers but the model stacks 2"):
    autoencoder_parts.load_encoder_init(nnx.State({"encoder": wrong}), str(tmp_path),
                                        prefix="encoder")
