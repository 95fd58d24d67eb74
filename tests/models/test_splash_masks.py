"""Splash attention with the models' masks, in Pallas interpret mode on CPU, against 'xla'.

The masks come from the models' own builders: MMDiT's joint [text, image] mask with padded
text (T2I), with hidden source tokens (edit: text + target + source), with causal text, and the
text encoder's causal & padding masks (grouped-query attention). Values and gradients of q, k, v.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from psvae_jax.models import attention, mmdit, text_encoder
from psvae_jax.models.attention_mask import AttentionMask


def _qkv(length, heads=4, kv_heads=4, dim=32, batch=2, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, dim))
  k = jax.random.normal(keys[1], (batch, length, kv_heads, dim))
  v = jax.random.normal(keys[2], (batch, length, kv_heads, dim))
  return q, k, v


def _both(q, k, v, mask):
  """(out, grads) of splash in interpret mode and of xla, one jit."""
  scale = 1.0 / np.sqrt(q.shape[-1])
  splash = functools.partial(attention.splash_attention, mask=mask, scale=scale, interpret=True)
  xla = functools.partial(attention.dot_product_attention, mask=mask, impl="xla")

  def out_and_grads(fn):
    loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # a non-trivial output cotangent
    return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return jax.jit(lambda q, k, v: (out_and_grads(splash), out_and_grads(xla)))(q, k, v)


def _assert_same(q, k, v, mask):
  (out, grads), (ref, ref_grads) = _both(q, k, v, mask)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4)
  return out


TEXT_MASK = jnp.array([[1] * 12, [1] * 5 + [0] * 7], bool)


@pytest.mark.parametrize("causal_text", [False, True])
def test_t2i_joint_mask_padded_text(causal_text):
  q, k, v = _qkv(12 + 16)
  mask = mmdit.joint_attention_mask(12, 16, text_mask=TEXT_MASK, causal_text=causal_text)
  out = _assert_same(q, k, v, mask)
  # The padded text keys are excluded: changing them leaves example 1's output alone.
  k2, v2 = k.at[1, 5:12].set(7.0), v.at[1, 5:12].set(-3.0)
  out2 = jax.jit(lambda k, v: attention.splash_attention(
      q, k, v, mask=mask, scale=1 / np.sqrt(32), interpret=True))(k2, v2)
  np.testing.assert_allclose(np.asarray(out2[1]), np.asarray(out[1]), atol=1e-6)


def test_edit_joint_mask_text_target_source():
  # Text (8, padded in example 0) + 16 target + 16 source tokens; example 1 hides its source
  # (the image-unconditional branch), as MMDiT builds it.
  text_mask = jnp.array([[1] * 3 + [0] * 5, [1] * 8], bool)
  image_keys = jnp.concatenate([jnp.ones((2, 16), bool),
                                jnp.array([True, False])[:, None].repeat(16, 1)], axis=1)
  mask = mmdit.joint_attention_mask(8, 32, text_mask=text_mask, image_key_mask=image_keys)
  _assert_same(*_qkv(8 + 32), mask)
  # The image-only rows of the last block (queries from the image tokens on).
  q, k, v = _qkv(8 + 32, seed=1)
  _assert_same(q[:, 8:], k, v, mask[:, :, 8:] if mask.shape[2] > 1 else mask)


def test_text_encoder_causal_padding_mask_grouped_query():
  masks = text_encoder.layer_masks(TEXT_MASK, 12, sliding_window=5)
  q, k, v = _qkv(12, heads=4, kv_heads=2)
  for mask in masks.values():
    _assert_same(q, k, v, mask)


def test_example_with_no_valid_key_matches_xla():
  # xla: the mean of all values, and no q/k gradient through the constant masked logits.
  q, k, v = _qkv(20)
  mask = jnp.array([[True] * 20, [False] * 20])[:, None, None, :]
  _assert_same(q, k, v, mask)
  plain = lambda q, k, v: jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(
      mask, jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(32), -1e30), axis=-1), v)
  xla = functools.partial(attention.dot_product_attention, mask=mask, impl="xla")
  grads = [jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2)))(q, k, v)
           for fn in (xla, plain)]
  for g, r in zip(*grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5)


def test_unmasked_vit_length_padded_to_the_block():
  # The encoders' case (PS-VAE's TPU presets): no mask, DINOv2-with-registers' 1 + 4 + 256
  # tokens, padded to 384 inside the kernel; the padded keys must not be attended.
  q, k, v = _qkv(261, heads=2, kv_heads=2, dim=16, batch=1)
  _assert_same(q, k, v, None)


def test_under_a_mesh_in_shard_map():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  q, k, v = _qkv(12 + 16, batch=4)
  text_mask = jnp.concatenate([TEXT_MASK, TEXT_MASK[::-1]])
  mask = mmdit.joint_attention_mask(12, 16, text_mask=text_mask)
  spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
  with jax.set_mesh(mesh):
    _assert_same(q, k, v, mask)
    lowered = jax.jit(lambda q: attention.splash_attention(
        q, k, v, mask=mask, scale=0.2, interpret=True)).lower(q).as_text()
  assert "shard_map" in lowered or "manual" in lowered


def test_attention_mask_stands_for_its_dense_array():
  keys = jnp.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], bool)
  pattern = np.tril(np.ones((5, 5), bool))
  mask = AttentionMask(keys, pattern)
  dense = np.asarray(pattern)[None, None] & np.asarray(keys)[:, None, None, :]
  assert mask.shape == dense.shape
  np.testing.assert_array_equal(mask.dense(), dense)
  for index in [(slice(None), slice(None), slice(2, None)), (Ellipsis, slice(1, None)),
                (slice(None), slice(None), slice(3, None), slice(3, None))]:
    np.testing.assert_array_equal(mask[index].dense(), dense[index])
  key_only = AttentionMask(keys)
  np.testing.assert_array_equal(key_only[..., 2:].dense(), np.asarray(keys)[:, None, None, 2:])
  with pytest.raises(IndexError, match="query and key axes"):
    mask[:, 0:1]
  with pytest.raises(ValueError, match="lengths disagree"):
    AttentionMask(keys, np.ones((5, 4), bool))
