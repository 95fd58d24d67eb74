"""Scaled dot-product attention behind one function, with selectable implementations.

Every model calls `dot_product_attention(q, k, v, mask=..., impl=...)` with q/k/v laid out as
(batch, seq, heads, head_dim). Implementations:
  'xla'    plain einsum + softmax (float32 softmax), any backend; the numerics reference. Its
           backward is the flash-attention one (custom_vjp), and on CPU it splits the queries
           into chunks of at most 256 rows (faster there; exact, as query rows are independent).
  'cudnn'  `jax.nn.dot_product_attention`: the cuDNN flash kernel on GPU (which needs float16 or
           bfloat16 inputs), jax's own XLA implementation of the same function elsewhere.
  'splash' the Pallas splash kernel (`psvae_jax.models.splash`), lowered for TPU only: the
           platform the step is compiled for decides, not the host (no fallback).
           `splash_attention(..., interpret=True)` runs the same kernel in Pallas' interpret
           mode on any backend (slow: for numerics tests).
Grouped-query attention (fewer key/value heads than query heads) is supported by all three.
Masks are boolean arrays or an `AttentionMask` (static pattern & key validity; what splash
needs beyond key masks). A query row that sees no key gets the mean of all values, and q/k no
gradient through it.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from psvae_jax.models.attention_mask import AttentionMask
from psvae_jax.models.splash import splash_attention

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
# Most query rows one fused attention computation takes on XLA:CPU (see _xla_attention).
_CPU_QUERY_CHUNK = 256


def unstack(x: jax.Array, axis: int) -> list[jax.Array]:
  """The slices of `x` along `axis` (that axis removed), e.g. q, k, v of a fused projection.

  Same values as `list(jnp.moveaxis(x, axis, 0))`, but built on `lax.split`, whose gradient is
  one concatenate; indexing's gradient is a zero-padded full-size array per slice, summed (an
  8-layer MMDiT training step wrote 59 such arrays on XLA:CPU).
  """
  return [jnp.squeeze(part, axis) for part in jnp.split(x, x.shape[axis], axis=axis)]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, impl: str = "xla",
                          scale: float | None = None) -> jax.Array:
  """softmax(q k^T * scale, masked) v.

  Args:
    q: (batch, q_len, heads, head_dim).
    k, v: (batch, kv_len, kv_heads, head_dim); `heads` must be a multiple of `kv_heads`.
    mask: optional boolean array broadcastable to (batch, heads, q_len, kv_len), True = attend,
      or an `AttentionMask` describing one.
    impl: one of IMPLEMENTATIONS.
    scale: logit scale, default 1/sqrt(head_dim).
  Returns:
    (batch, q_len, heads, head_dim) in q's dtype.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q/k/v must be (batch, seq, heads, head_dim); got shapes {q.shape}, "
                     f"{k.shape}, {v.shape}")
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
    raise ValueError(f"incompatible q/k/v shapes {q.shape}, {k.shape}, {v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads "
                     f"({k.shape[2]})")
  if impl == "splash":
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return splash_attention(q, k, v, mask=mask, scale=scale)
  if isinstance(mask, AttentionMask):
    mask = mask.dense()
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
    if mask.ndim != 4:
      raise ValueError(f"mask must be 4-D, broadcastable to (batch, heads, q_len, kv_len); "
                       f"got shape {mask.shape}")
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  if impl == "xla":
    return _xla_attention(q, k, v, mask, scale)
  if impl == "cudnn":
    implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                        implementation=implementation)
  raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLEMENTATIONS}")


def _xla_attention(q, k, v, mask, scale):
  q_len, kv_len = q.shape[1], k.shape[1]
  groups = q.shape[2] // k.shape[2]
  # Heads-major layout with explicit transposes: the batched matmuls then have leading batch
  # dims, which XLA:CPU runs about 2x faster than einsums over the (batch, seq, heads, head_dim)
  # layout. (The repeated-key/value and mask handling is in _attend_queries.)
  kt = jnp.transpose(k, (0, 2, 1, 3))
  vt = jnp.transpose(v, (0, 2, 1, 3))
  if mask is not None:
    mask = jnp.broadcast_to(mask, (mask.shape[0], q.shape[2], q_len, kv_len))
  # Query positions are independent, so splitting them into chunks is exact. On XLA:CPU the
  # fused dot-softmax-dot of more than 256 query rows runs about 3x slower than two halves (a
  # DINOv2-B/14 forward at 261 tokens spent 40% of its time there unsplit). The split is taken
  # before the transposes (lax.split, whose gradient is a concatenate) so no chunk is copied
  # out of a transposed array.
  chunk = q_len if jax.default_backend() != "cpu" else max(1, _CPU_QUERY_CHUNK // groups)
  pieces = -(-q_len // chunk)
  bounds = [round(i * q_len / pieces) for i in range(1, pieces)]
  q_chunks = jnp.split(q, bounds, axis=1)  # [q] itself when bounds is empty
  mask_chunks = [None] * len(q_chunks) if mask is None else jnp.split(mask, bounds, axis=2)
  outs = [_attend_queries(qc, kt, vt, mc, scale, groups)
          for qc, mc in zip(q_chunks, mask_chunks)]
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _attend_queries(q, kt, vt, mask, scale, groups):
  """Attention of (batch, len, heads, head_dim) queries to heads-major keys/values."""
  batch, q_len, heads, head_dim = q.shape
  kv_heads, kv_len = kt.shape[1], kt.shape[2]
  # Query head h uses key/value head h // groups (transformers' repeat_kv): the queries of a
  # group are stacked along the query axis, (batch, kv_heads, groups * q_len, head_dim), so
  # every case is a 4-D batched matmul and repeated keys/values are never materialised. The
  # scale multiplies q, the smaller operand, not the logits. (A size-1 groups axis and the
  # scaled logits cost an 8-layer MMDiT training step about 7% on a 2-core CPU.)
  qt = jnp.transpose(q * jnp.asarray(scale, q.dtype), (0, 2, 1, 3))
  qt = qt.reshape(batch, kv_heads, groups * q_len, head_dim)
  if mask is not None:
    mask = mask.reshape(mask.shape[0], kv_heads, groups * q_len, kv_len)
  out = _attend(qt, kt, vt, mask).reshape(batch, heads, q_len, head_dim)
  return jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype)


def _attend_forward(qt, kt, vt, mask):
  """(softmax(qt kt^T) vt, the float32 softmax weights) over (batch, kv_heads, rows, head_dim)."""
  logits = jnp.einsum("bkqd,bksd->bkqs", qt, kt, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bkqs,bksd->bkqd", weights.astype(vt.dtype), vt), weights


@jax.custom_vjp
def _attend(qt, kt, vt, mask):
  """softmax(qt kt^T) vt with a float32 softmax; the mask gets no gradient."""
  return _attend_forward(qt, kt, vt, mask)[0]


def _attend_fwd(qt, kt, vt, mask):
  out, weights = _attend_forward(qt, kt, vt, mask)
  return out, (qt, kt, vt, mask, weights, out)


def _attend_bwd(residuals, d_out):
  # The flash-attention backward: d logits = w * (d_out v^T - rowsum(d_out * out)). Autodiff of
  # the softmax's division instead materialises full-size broadcasts of 1/sum on XLA:CPU. Same
  # values up to rounding. (Measured only together with the split changes of the same commit:
  # 8-layer MMDiT training step 1.81-1.92 s -> 1.73-1.78 s on a 2-core CPU.)
  qt, kt, vt, mask, weights, out = residuals
  d_v = jnp.einsum("bkqs,bkqd->bksd", weights.astype(vt.dtype), d_out)
  d_weights = jnp.einsum("bkqd,bksd->bkqs", d_out, vt, preferred_element_type=jnp.float32)
  row_dot = jnp.einsum("bkqd,bkqd->bkq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  d_logits = weights * (d_weights - row_dot[..., None])
  if mask is not None:  # masked logits are constants: no gradient (rows that see no key)
    d_logits = jnp.where(mask, d_logits, 0.0)
  d_q = jnp.einsum("bkqs,bksd->bkqd", d_logits, kt.astype(jnp.float32)).astype(qt.dtype)
  d_k = jnp.einsum("bkqs,bkqd->bksd", d_logits, qt.astype(jnp.float32)).astype(kt.dtype)
  return d_q, d_k, d_v.astype(vt.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)
