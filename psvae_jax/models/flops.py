"""Analytic FLOP counts per model, for throughput and MFU logging.

Conventions: a matmul of (m, k) by (k, n) costs 2 m k n FLOPs; only matmuls (including the two
attention matmuls) are counted, elementwise work is not. A training step costs 3x the forward
pass (backward = 2x forward: gradients with respect to activations and to weights).
"""
from __future__ import annotations

from psvae_jax.models.mmdit import MMDiTConfig

# ---- MMDiT ---------------------------------------------------------------------------------


def _mmdit_block_flops(width: int, mlp: int, text_len: int, image_len: int, *,
                       context_pre_only: bool, dual: bool) -> int:
  """Forward FLOPs of one joint block for one example, excluding the adaLN modulations."""
  d = width
  length = text_len + image_len
  img = 2 * image_len * d * (3 * d + d + 2 * mlp)  # qkv, out, mlp
  if context_pre_only:
    txt = 2 * text_len * d * 2 * d  # keys and values only
    attn = 4 * image_len * length * d  # image queries over all keys: scores + weighted sum
  else:
    txt = 2 * text_len * d * (3 * d + d + 2 * mlp)
    attn = 4 * length * length * d
  flops = img + txt + attn
  if dual:
    flops += 2 * image_len * d * 4 * d + 4 * image_len * image_len * d
  return flops


def mmdit_forward_flops(config: MMDiTConfig, batch: int, text_len: int, *,
                        image_tokens: int | None = None, source_tokens: int = 0) -> int:
  """Forward matmul FLOPs of `MMDiT(config)` for `batch` examples.

  image_tokens: target tokens per example (default: the `sample_size` latent at
  `patch_size`); source_tokens: extra source-image tokens per example (editing).
  """
  c = config
  d = c.width
  n = image_tokens if image_tokens is not None else (c.sample_size // c.patch_size) ** 2
  image_len = n + source_tokens
  patch_in = c.patch_size ** 2 * c.in_channels
  patch_out = c.patch_size ** 2 * c.out_dim
  flops = 2 * image_len * patch_in * d  # patch embedding (target and source)
  flops += 2 * text_len * c.text_dim * d  # context embedder
  flops += 2 * (c.timestep_embed_dim * d + d * d) + 2 * (c.pooled_dim * d + d * d)
  for i in range(c.num_layers):
    last = i == c.num_layers - 1
    dual = i in c.dual_attention_layers
    flops += _mmdit_block_flops(d, c.mlp_dim, text_len, image_len, context_pre_only=last,
                                dual=dual)
    img_chunks = 9 if dual else 6
    txt_chunks = 2 if last else 6
    flops += 2 * d * d * (img_chunks + txt_chunks)  # per-example adaLN modulations
  if c.ddt_head is None:
    flops += 2 * d * 2 * d + 2 * n * d * patch_out  # norm_out modulation, proj_out
  else:
    h = c.ddt_head
    w = h.width
    flops += 2 * n * (d * w + patch_in * w)  # condition projection, noisy-input embedding
    per_block = 2 * n * w * (6 * w + 3 * w + w + 3 * h.mlp_dim) + 4 * n * n * w
    flops += h.depth * per_block
    flops += 2 * n * w * (2 * w + patch_out)  # final modulation (per token), final linear
  return batch * flops


def mmdit_train_flops(config: MMDiTConfig, batch: int, text_len: int, *,
                      image_tokens: int | None = None, source_tokens: int = 0) -> int:
  """FLOPs of one training step (forward + backward = 3x forward) of `MMDiT(config)`."""
  return 3 * mmdit_forward_flops(config, batch, text_len, image_tokens=image_tokens,
                                 source_tokens=source_tokens)
