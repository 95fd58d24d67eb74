"""The fast attention paths against the plain 'xla' one, on CPU.

'splash': the TPU Pallas kernel itself, run in Pallas' interpret mode (works on CPU), with the
padding to 128-multiples and the grouped-query repeat of `attention.splash_attention`; values
and gradients. 'cudnn': off GPU it is `jax.nn.dot_product_attention`'s XLA implementation
(the same as implementation=None there).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psvae_jax.models import attention


def _qkv(q_len, kv_len, heads=4, kv_heads=2, dim=32, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, q_len, heads, dim), dtype)
  k = jax.random.normal(keys[1], (2, kv_len, kv_heads, dim), dtype)
  v = jax.random.normal(keys[2], (2, kv_len, kv_heads, dim), dtype)
  return q, k, v


def _outputs_and_grads(fn, q, k, v):
  loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # a non-trivial output cotangent
  return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def test_splash_kernel_in_interpret_mode_matches_xla():
  # Cross-attention lengths that are not multiples of the kernel's 128 block: both padded.
  q, k, v = _qkv(72, 130)
  scale = 0.2
  splash = functools.partial(attention.splash_attention, scale=scale, interpret=True)
  xla = functools.partial(attention.dot_product_attention, impl="xla", scale=scale)
  (out, grads), (ref, ref_grads) = jax.jit(
      lambda q, k, v: (_outputs_and_grads(splash, q, k, v), _outputs_and_grads(xla, q, k, v)))(
          q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
  for g, r in zip(grads, ref_grads):
    assert g.shape == r.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4)


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="the error is for other backends")
def test_splash_outside_tpu_and_interpret_mode_raises():
  q, k, v = _qkv(8, 8)
  # The kernel lowers for TPU only (the compile target decides; config validation says so first).
  with pytest.raises(ValueError, match="Only interpret mode"):
    attention.dot_product_attention(q, k, v, impl="splash")
  with pytest.raises(ValueError, match=r"key mask of shape \(batch, 1, 1, 8\)"):
    attention.splash_attention(q, k, v, mask=jnp.ones((1, 1, 8, 8), bool), scale=1.0,
                               interpret=True)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN's kernel runs on GPU")
def test_cudnn_impl_off_gpu_is_jax_default_implementation():
  q, k, v = _qkv(9, 12)
  mask = jnp.ones((2, 1, 9, 12), bool).at[1, ..., 8:].set(False)
  # jax.nn takes (batch, seq, heads, dim) too, with matching key/value head counts.
  k_full, v_full = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
  ours, default, xla = jax.jit(lambda q, k, v: (
      attention.dot_product_attention(q, k, v, mask=mask, impl="cudnn"),
      jax.nn.dot_product_attention(q, k_full, v_full, mask=mask, implementation=None),
      attention.dot_product_attention(q, k, v, mask=mask, impl="xla")))(q, k, v)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(default), atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(xla), atol=1e-5)
