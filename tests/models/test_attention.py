"""Numerics of the attention implementations against each other and a float64 reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psvae_jax.models import attention

# One compile per call signature (eager dispatch compiles every op separately: slower here).
dot_product_attention = jax.jit(attention.dot_product_attention,
                                static_argnames=("impl", "scale"))


def _reference(q, k, v, mask, scale):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _inputs(heads=4, kv_heads=4, q_len=9, kv_len=9, dim=16, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (2, q_len, heads, dim), dtype)
  k = jax.random.normal(keys[1], (2, kv_len, kv_heads, dim), dtype)
  v = jax.random.normal(keys[2], (2, kv_len, kv_heads, dim), dtype)
  return q, k, v


def _padding_causal_mask(q_len, kv_len):
  lengths = jnp.array([kv_len, kv_len - 3])
  keys = jnp.arange(kv_len)[None, :] < lengths[:, None]
  causal = jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None]
  return causal[None, None] & keys[:, None, None, :]


@pytest.mark.parametrize("impl", ["xla", "cudnn"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64_reference(impl, kv_heads, masked):
  q, k, v = _inputs(kv_heads=kv_heads)
  mask = _padding_causal_mask(9, 9) if masked else None
  out = dot_product_attention(q, k, v, mask=mask, impl=impl)
  ref = _reference(q, k, v, mask, 1 / 4.0)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_implementations_agree_cross_attention_custom_scale_bf16():
  q, k, v = _inputs(q_len=5, kv_len=12, heads=4, kv_heads=2)
  mask = jnp.ones((1, 1, 5, 12), bool).at[..., -4:].set(False)
  a = dot_product_attention(q, k, v, mask=mask, impl="xla", scale=0.3)
  b = dot_product_attention(q, k, v, mask=mask, impl="cudnn", scale=0.3)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  a16 = dot_product_attention(qb, kb, vb, mask=mask, impl="xla", scale=0.3)
  b16 = dot_product_attention(qb, kb, vb, mask=mask, impl="cudnn", scale=0.3)
  assert a16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(a16, np.float32), np.asarray(a), atol=5e-2)
  np.testing.assert_allclose(np.asarray(a16, np.float32), np.asarray(b16, np.float32), atol=5e-2)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
def test_splash_matches_xla_on_tpu():
  q, k, v = _inputs(q_len=200, kv_len=200, dim=64, dtype=jnp.bfloat16)
  a = dot_product_attention(q, k, v, impl="xla")
  b = dot_product_attention(q, k, v, impl="splash")
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-2)


def test_bad_arguments_are_named():
  q, k, v = _inputs()
  with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
    attention.dot_product_attention(q, k, v, impl="flash")
  with pytest.raises(ValueError, match="boolean"):
    attention.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 9, 9)))
  with pytest.raises(ValueError, match="multiple"):
    attention.dot_product_attention(q, k[:, :, :3], v[:, :, :3])


def _plain_attention(q, k, v, mask, scale):
  """Textbook attention in jnp (repeated key/value heads), differentiated by jax's autodiff."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, -1e30)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_xla_gradients_match_autodiff_with_query_chunks(kv_heads, masked):
  # 300 query positions: on CPU the queries are split into chunks, and the xla path has its
  # own backward (custom_vjp); both must give autodiff's gradients of the plain formula.
  q, k, v = _inputs(q_len=300, kv_len=300, kv_heads=kv_heads, dim=8)
  mask = _padding_causal_mask(300, 300) if masked else None
  cotangent = jax.random.normal(jax.random.key(7), q.shape)

  def loss(fn):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), argnums=(0, 1, 2)))

  ours = loss(lambda q, k, v: attention.dot_product_attention(q, k, v, mask=mask, impl="xla"))
  plain = loss(lambda q, k, v: _plain_attention(q, k, v, mask, 1 / np.sqrt(8)))
  for got, want in zip(ours(q, k, v), plain(q, k, v)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
  out = dot_product_attention(q, k, v, mask=mask, impl="xla")
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, mask, 1 / np.sqrt(8)),
                             atol=1e-5)


def test_unstack_matches_indexing_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  parts = attention.unstack(x, 2)
  assert len(parts) == 3
  for i, part in enumerate(parts):
    np.testing.assert_array_equal(np.asarray(part), np.asarray(x[:, :, i]))
  weights = jnp.arange(3.0) + 1
  grad = jax.grad(lambda x: sum(w * jnp.sum(p ** 2) for w, p in
                                zip(weights, attention.unstack(x, 2))))(x)
  want = jax.grad(lambda x: sum(weights[i] * jnp.sum(x[:, :, i] ** 2) for i in range(3)))(x)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-6)
