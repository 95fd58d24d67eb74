"""The 'splash' attention implementation: the Pallas TPU splash kernel behind the models' layout.

Masks are an `AttentionMask` (a static pattern and-ed with per-example key validity) or a dense
key mask (batch or 1, 1, 1, kv_len). The pattern becomes the kernel's static block mask (blocks
it rules out are skipped); key validity becomes segment ids: every query has id 1 and a key has
id 1 when valid, 0 when masked. Queries are never masked themselves, as in the xla path: a
padded text token still attends to the valid keys (its output is meaningless and unused).

Sequences are padded to a multiple of the block size (128, or 256/512 where that adds no
padding); the padded keys get segment id 0 and the padded query rows are dropped. A query row
that sees no key (e.g. a padded token under a sliding window) gets, as in the xla path, the mean
of all values, and q/k no gradient through it (the derivative of its constant masked logits).

Under a mesh the kernel runs in `jax.shard_map` over the batch ('data', 'fsdp') and, where the
query and key/value head counts both divide it, the heads ('tensor'); sequences stay whole.
Without `interpret`, the kernel lowers only for TPU: it is chosen by the platform the step is
compiled for (AOT from a CPU host for a TPU topology works); config validation rejects the
combination on other platforms.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from psvae_jax import sharding
from psvae_jax.models.attention_mask import AttentionMask

_LANES = 128
_BLOCKS = (512, 256, 128)


def block_size(length: int) -> int:
  """The largest kernel block (512, 256 or 128) that divides `length` rounded up to 128."""
  padded = -(-length // _LANES) * _LANES
  return next(b for b in _BLOCKS if padded % b == 0)


def _as_structured(mask, q_len: int, kv_len: int) -> AttentionMask | None:
  if mask is None or isinstance(mask, AttentionMask):
    return mask
  if mask.shape[1:3] != (1, 1) or mask.shape[3] != kv_len:
    raise ValueError(
        f"attention impl 'splash' takes a key mask of shape (batch, 1, 1, {kv_len}) or an "
        f"AttentionMask (static pattern & key validity); got a dense mask of shape {mask.shape}")
  return AttentionMask(mask[:, 0, 0, :], kv_len=kv_len)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask=None, scale: float,
                     interpret: bool = False) -> jax.Array:
  """softmax(q k^T * scale, masked) v with the splash kernel (layout as `dot_product_attention`).

  interpret: run the kernel in Pallas' interpret mode, which works on any backend (slow: for
  numerics tests); otherwise it lowers for TPU only.
  """
  batch, q_len, heads = q.shape[:3]
  kv_len, kv_heads = k.shape[1], k.shape[2]
  mask = _as_structured(mask, q_len, kv_len)
  pattern = None if mask is None else mask.pattern
  if pattern is not None:
    if pattern.shape != (q_len, kv_len):
      raise ValueError(f"mask pattern shape {pattern.shape} does not match q_len {q_len} and "
                       f"kv_len {kv_len}")
    if not pattern.any(axis=1).all():
      raise ValueError("attention impl 'splash' needs every query row of the mask pattern to "
                       f"see a key; rows {np.flatnonzero(~pattern.any(axis=1))[:8]} see none")
  keys = jnp.ones((batch, kv_len), bool)
  if mask is not None and mask.keys is not None:
    keys = jnp.broadcast_to(mask.keys, (batch, kv_len))
  if pattern is None:
    sees_a_key = keys.any(axis=1)[:, None]  # (batch, 1)
  else:
    sees_a_key = jnp.einsum("bk,qk->bq", keys.astype(jnp.float32), pattern.astype(np.float32),
                            preferred_element_type=jnp.float32) > 0  # (batch, q_len)
  q = q * jnp.asarray(scale, q.dtype)

  block_q, block_kv = block_size(q_len), block_size(kv_len)
  q_pad, kv_pad = -q_len % block_q, -kv_len % block_kv
  full_pattern = np.zeros((q_len + q_pad, kv_len + kv_pad), bool)
  full_pattern[:, :kv_len] = True if pattern is None else np.pad(pattern, ((0, q_pad), (0, 0)),
                                                                 constant_values=True)
  q = jnp.pad(q, ((0, 0), (0, q_pad), (0, 0), (0, 0)))
  k = jnp.pad(k, ((0, 0), (0, kv_pad), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, kv_pad), (0, 0), (0, 0)))
  q_ids = jnp.ones((batch, q_len + q_pad), jnp.int32)
  kv_ids = jnp.pad(keys.astype(jnp.int32), ((0, 0), (0, kv_pad)))

  run = functools.partial(_run_kernel, full_pattern=full_pattern, blocks=(block_q, block_kv),
                          interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty:
    run = _shard(run, mesh, q.shape, k.shape)
  out = run(q, k, v, q_ids, kv_ids)[:, :q_len]
  mean_v = jnp.repeat(jnp.mean(v[:, :kv_len], axis=1, dtype=jnp.float32), heads // kv_heads, 1)
  out = jnp.where(sees_a_key[:, :, None, None], out, mean_v[:, None].astype(out.dtype))
  return out.astype(q.dtype)


def _shard(run, mesh, q_shape, kv_shape):
  """`run` in shard_map over the batch and (where both head counts divide it) head axes."""
  batch_axes = sharding.logical_to_pspec(("batch",), q_shape[:1], mesh)[0]
  q_heads = sharding.logical_to_pspec((None, "heads"), q_shape[1:3], mesh)[1]
  kv_heads = sharding.logical_to_pspec((None, "heads"), kv_shape[1:3], mesh)[1]
  head_axes = q_heads if q_heads == kv_heads else None
  qkv = P(batch_axes, None, head_axes, None)
  ids = P(batch_axes, None)
  return jax.shard_map(run, mesh=mesh, in_specs=(qkv, qkv, qkv, ids, ids), out_specs=qkv,
                       check_vma=False)


def _run_kernel(q, k, v, q_ids, kv_ids, *, full_pattern, blocks, interpret):
  """The kernel over (batch, seq, heads, head_dim) arrays (the local shard under a mesh)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  heads = q.shape[2]
  block_q, block_kv = blocks
  sizes = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                        block_q_dkv=block_q, block_kv_dkv=block_kv,
                        block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
  head_mask = sm.NumpyMask(full_pattern)
  kernel = sk.make_splash_mha(sm.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)
  to_hsd = lambda x: jnp.swapaxes(x, 0, 1)  # (seq, heads, d) -> (heads, seq, d)

  def one_example(q, k, v, q_ids, kv_ids):
    out = kernel(to_hsd(q), to_hsd(k), to_hsd(v), segment_ids=sk.SegmentIds(q=q_ids, kv=kv_ids))
    return to_hsd(out)

  return jax.vmap(one_example)(q, k, v, q_ids, kv_ids)
