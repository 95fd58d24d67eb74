"""SD3-style MMDiT: a two-stream (text, image) transformer with joint attention, the T2I and
editing generator on the PS-VAE latent.

Forward pass (diffusers' `SD3Transformer2DModel` semantics):
  image tokens  = patch_embed(NHWC latent) + 2D position embedding
  cond          = MLP(sinusoidal(timestep)) + MLP(pooled text)     (timestep = t * 1000)
  text tokens   = Linear(text encoder states)
  N joint blocks: per stream adaLN-Zero (shift/scale/gate x attention, MLP from silu(cond)),
                  per-stream q/k/v (+ optional per-head RMSNorm on q and k), ONE attention over
                  [text, image] tokens, per-stream output projection and MLP. The last block is
                  `context_pre_only`: its text stream only provides keys/values (adaLN-continuous
                  norm, no output), exactly as SD3. SD3.5's dual-attention blocks (an extra
                  image-only self-attention) are supported through `dual_attention_layers`.
  output        = AdaLayerNormContinuous + Linear + unpatchify, or the wide DDT head
                  (`psvae_jax.models.ddt_head`) on the image tokens when `config.ddt_head` is set.

Options for this project: patch size 1 on 16x16x96 latents, fixed SD3 sincos (cropped from a
`pos_embed_max_size` grid) or learned position embeddings, a text padding mask, a causal mask
among text tokens, and editing: clean source latents enter the image stream as extra tokens with
their own positions plus a learned source embedding (they share the image stream's weights and
timestep modulation, and are never noised by the model); only the target tokens are returned. A
per-example `source_mask` hides the source tokens from attention, which makes the output
identical to a call without source (the T2I model / the image-unconditional CFG branch).

Parameter layout (logical axis names in brackets; `blocks.<i>` unscanned, `block_groups.<g>`
scanned with a leading [layers] axis per run of equal blocks):
  patch_embed.kernel (p, p, C, D) [None, None, None, conv_out], patch_embed.bias
  pos_embed (max*max, D) [None, embed]                       learned position embedding only
  source_embedding (D,) [embed]                              editing only
  edit_positions (max*max, D) [None, embed]                  editing with edit_position_std > 0
  time_fc1 (256, D), time_fc2 (D, D), pooled_fc1 (P, D), pooled_fc2 (D, D), context_embedder
  blocks.<i>.{img,txt}_modulation.linear (D, 6D) [embed, mlp]  zero-init (adaLN-Zero)
  blocks.<i>.{img,txt}_qkv.kernel (D, 3, D) [embed, None, heads], .bias (3, D)
  blocks.<i>.{img,txt}_{q,k}_norm.scale (head_dim,)           with qk_norm='rms_norm'
  blocks.<i>.{img,txt}_out (D, D) [heads, embed], {img,txt}_mlp.fc1/fc2 [embed, mlp]/[mlp, embed]
  blocks.<i>.attn2_{qkv,q_norm,k_norm,out}                    dual-attention blocks only
  last_block: as a block, but txt_modulation (D, 2D), txt_qkv (D, 2, D) (keys, values), no
              txt_q_norm / txt_out / txt_mlp
  norm_out.linear (D, 2D), proj_out (D, p*p*C_out), both zero-init   without a DDT head
  ddt_head.*                                                  with a DDT head
Modulation chunk orders follow diffusers: (shift, scale, gate) x (attn, mlp) [x attn2], and
(scale, shift) for the adaLN-continuous norms.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.models import remat as remat_lib
from psvae_jax.models.attention import dot_product_attention, unstack
from psvae_jax.models.attention_mask import AttentionMask
from psvae_jax.models.grad_barrier import materialize_grad
from psvae_jax.models.ddt_head import DDTHead, DDTHeadConfig, RMSNorm
from psvae_jax.models.vit import Mlp, PatchEmbed, stacked_layers
from psvae_jax.models import dense
from psvae_jax.sharding import constrain

Dtype = Any

POS_EMBED_TYPES = ("sincos", "learned")
QK_NORMS = (None, "rms_norm")
TIMESTEP_SCALE = 1000.0  # diffusers' SD3 convention: the model sees t * 1000


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Shape of an MMDiT. Width D = num_heads * head_dim.

  sample_size: latent height/width (in latent pixels) the fixed sincos grid is scaled for
    (diffusers' `sample_size`); pos_embed_max_size: side of the position grid that is centre-
    cropped to the input's patch grid (None: the grid is built for the input's size).
  text_dim / pooled_dim: the text encoder's width / the pooled vector's width (diffusers'
    `joint_attention_dim` / `pooled_projection_dim`).
  causal_text: text tokens attend only to earlier text tokens (image tokens see all text).
  edit: adds the learned source embedding for source-image tokens.
  edit_position_std: editing only; > 0 adds a learned per-cell code, drawn from
    N(0, edit_position_std^2), to the target token and the source token of the same grid cell
    (0: none). The 2D sincos embedding hardly tells neighbouring cells apart (cosine 0.98
    between adjacent cells of an 8x8 grid at width 128), so attending from a target token to
    the source token of its own cell (copying what the edit leaves alone) must first be
    learned; random codes are nearly orthogonal between cells from the start.
  ddt_head: the wide DDT head replaces the final norm + linear when set.
  """
  num_layers: int = 2
  num_heads: int = 2
  head_dim: int = 64
  in_channels: int = 96
  out_channels: int | None = None
  patch_size: int = 1
  sample_size: int = 16
  pos_embed_max_size: int | None = 16
  pos_embed: str = "sincos"
  mlp_ratio: float = 4.0
  text_dim: int = 896
  pooled_dim: int = 896
  qk_norm: str | None = "rms_norm"
  dual_attention_layers: tuple[int, ...] = ()
  causal_text: bool = False
  edit: bool = False
  edit_position_std: float = 0.0
  ddt_head: DDTHeadConfig | None = None
  timestep_embed_dim: int = 256

  def __post_init__(self):
    # Accept plain containers from ml_collections / JSON configs; keep the config hashable.
    head = self.ddt_head
    if hasattr(head, "to_dict"):  # ml_collections.ConfigDict
      head = head.to_dict()
    if isinstance(head, Mapping):
      object.__setattr__(self, "ddt_head", DDTHeadConfig(**head))
    object.__setattr__(self, "dual_attention_layers",
                       tuple(int(i) for i in self.dual_attention_layers))
    if self.pos_embed not in POS_EMBED_TYPES:
      raise ValueError(f"pos_embed {self.pos_embed!r} not in {POS_EMBED_TYPES}")
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"qk_norm {self.qk_norm!r} not in {QK_NORMS}")
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f"dual_attention_layers {bad} outside 0..{self.num_layers - 1}")
    if self.width % 4:
      raise ValueError(f"width {self.width} must be divisible by 4 (2D sincos embedding)")
    if self.pos_embed == "learned" and self.pos_embed_max_size is None and \
        self.sample_size % self.patch_size:
      raise ValueError("learned position embeddings need sample_size divisible by patch_size")

  @property
  def width(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def out_dim(self) -> int:
    return self.out_channels if self.out_channels is not None else self.in_channels

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  @property
  def base_grid(self) -> int:
    """The patch grid the sincos positions are scaled for (diffusers' `base_size`)."""
    return self.sample_size // self.patch_size

  @property
  def pos_grid(self) -> int:
    """Side of the stored position grid (learned embeddings)."""
    return self.pos_embed_max_size or self.base_grid


# The paper's generators: a Qwen2.5-0.5B text encoder (896 wide) and 16x16x96 PS-VAE latents,
# patch 1, with RAE's 2048-wide DDT head (162M / 163M of the totals). Parameters: tiny 0.94M,
# base 642.7M (paper: ~650M), large 1.668B (paper: ~1.7B).
PRESETS = {
    "tiny": MMDiTConfig(num_layers=2, num_heads=2, head_dim=32, text_dim=64, pooled_dim=64,
                        ddt_head=DDTHeadConfig(width=128, depth=2, num_heads=2)),
    # 4 layers of width 128 (CPU toy runs: the tiny preset draws blobs, not shapes).
    "small": MMDiTConfig(num_layers=4, num_heads=4, head_dim=32, text_dim=64, pooled_dim=64,
                         ddt_head=DDTHeadConfig(width=128, depth=2, num_heads=2)),
    # The smallest shape that still has every part of the model (checkpoint fixtures).
    # Two layers: a block and the last (context_pre_only) block.
    "micro": MMDiTConfig(num_layers=2, num_heads=2, head_dim=4, text_dim=8, pooled_dim=8,
                         timestep_embed_dim=8,
                         ddt_head=DDTHeadConfig(width=8, depth=1, num_heads=2)),
    "base": MMDiTConfig(num_layers=13, num_heads=16, head_dim=64, ddt_head=DDTHeadConfig()),
    "large": MMDiTConfig(num_layers=18, num_heads=24, head_dim=64, ddt_head=DDTHeadConfig()),
}


def mmdit_preset(name: str, **overrides) -> MMDiTConfig:
  """A named preset ('tiny', 'small', 'base' ~650M, 'large' ~1.7B) with field overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown MMDiT preset {name!r}; expected one of {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


def param_count(config: MMDiTConfig) -> int:
  """Number of parameters of `MMDiT(config)` (abstract: nothing is allocated)."""
  state = jax.eval_shape(lambda: nnx.state(MMDiT(config, rngs=nnx.Rngs(0)), nnx.Param))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def timestep_embedding(timesteps: jax.Array, dim: int = 256,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding (batch, dim) as diffusers' `Timesteps(dim, flip_sin_to_cos=True,
  downscale_freq_shift=0)`: [cos(t w), sin(t w)], w_j = max_period^(-j / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


@functools.lru_cache(maxsize=64)
def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_size: int,
                        interpolation_scale: float = 1.0) -> np.ndarray:
  """SD3's fixed 2D sincos table (grid_h * grid_w, dim), row-major tokens, float32.

  Positions are scaled to a `base_size` grid (row i -> i * base_size / grid_h). As in diffusers
  (and MAE), the first half of the channels encodes the column, the second half the row; each
  half is [sin(pos w), cos(pos w)] with w_j = 10000^(-j / (dim/4)). Computed in float64.
  """
  def one_axis(pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    out = np.outer(pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (n, dim / 2)

  rows = one_axis(np.arange(grid_h, dtype=np.float64) / (grid_h / base_size) /
                  interpolation_scale)
  cols = one_axis(np.arange(grid_w, dtype=np.float64) / (grid_w / base_size) /
                  interpolation_scale)
  table = np.concatenate([np.broadcast_to(cols[None], (grid_h, grid_w, dim // 2)),
                          np.broadcast_to(rows[:, None], (grid_h, grid_w, dim // 2))], axis=-1)
  return table.reshape(grid_h * grid_w, dim).astype(np.float32)


def crop_pos_grid(table: jax.Array, side: int, grid_h: int, grid_w: int) -> jax.Array:
  """Centre crop of a (side*side, dim) position table to (grid_h*grid_w, dim), as SD3."""
  if grid_h > side or grid_w > side:
    raise ValueError(f"patch grid {grid_h}x{grid_w} is larger than the position grid "
                     f"{side}x{side} (pos_embed_max_size)")
  top, left = (side - grid_h) // 2, (side - grid_w) // 2
  grid = table.reshape(side, side, -1)[top:top + grid_h, left:left + grid_w]
  return grid.reshape(grid_h * grid_w, -1)


def mean_pool(states: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Masked mean over tokens (batch, seq, dim) -> (batch, dim): the pooled text vector."""
  if mask is None:
    return states.mean(axis=1)
  weights = mask.astype(states.dtype)[..., None]
  return (states * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)


def joint_attention_mask(text_len: int, image_len: int, *, text_mask: jax.Array | None = None,
                         image_key_mask: jax.Array | None = None,
                         causal_text: bool = False) -> AttentionMask | None:
  """Mask over the joint [text, image] sequence, True = attend, or None when full.

  text_mask (batch, text_len) and image_key_mask (batch, image_len) hide invalid keys from every
  query. causal_text lets text query i see text keys j <= i only. Shape (batch, 1, 1, L) for key
  masks alone, (batch or 1, 1, L, L) with causal text (`.dense()` gives the array).
  """
  if text_mask is None and image_key_mask is None and not causal_text:
    return None
  length = text_len + image_len
  keys = pattern = None
  if text_mask is not None or image_key_mask is not None:
    batch = (text_mask if text_mask is not None else image_key_mask).shape[0]
    tm = (jnp.ones((batch, text_len), bool) if text_mask is None
          else jnp.asarray(text_mask).astype(bool))
    im = (jnp.ones((batch, image_len), bool) if image_key_mask is None
          else jnp.asarray(image_key_mask).astype(bool))
    keys = jnp.concatenate([tm, im], axis=1)
  if causal_text:
    idx = np.arange(length)
    is_text = idx < text_len
    pattern = ~(is_text[:, None] & is_text[None, :]) | (idx[None, :] <= idx[:, None])
  return AttentionMask(keys, pattern, kv_len=length)


def _dense(d_in: int, d_out: int, names, *, init: str = "xavier", dtype: Dtype,
           param_dtype: Dtype, rngs: nnx.Rngs) -> dense.Linear:
  kernel_init = {"xavier": nnx.initializers.xavier_uniform(),
                 "zeros": nnx.initializers.zeros,
                 "normal": nnx.initializers.normal(0.02)}[init]
  return dense.Linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.with_partitioning(kernel_init, names),
                      bias_init=nnx.with_partitioning(nnx.initializers.zeros, (names[1],)),
                      rngs=rngs)


def _layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters; statistics in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return _layer_norm(x) * (1 + scale) + shift


class Modulation(nnx.Module):
  """adaLN parameters from the activated condition: Linear(D, chunks*D), zero-init."""

  def __init__(self, width: int, chunks: int, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.chunks = chunks
    self.linear = _dense(width, chunks * width, ("embed", "mlp"), init="zeros", dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

  def __call__(self, cond_act: jax.Array) -> list[jax.Array]:
    """cond_act (batch, D) -> `chunks` arrays (batch, 1, D)."""
    return jnp.split(self.linear(cond_act)[:, None, :], self.chunks, axis=-1)


class Projection(nnx.Module):
  """`parts` fused projections of one stream (e.g. q, k, v): kernel (D, parts, D)."""

  def __init__(self, width: int, parts: int, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    init = nnx.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
    self.kernel = nnx.Param(init(rngs.params(), (width, parts, width), param_dtype),
                            out_sharding=("embed", None, "heads"))
    self.bias = nnx.Param(jnp.zeros((parts, width), param_dtype), out_sharding=(None, "heads"))

  def __call__(self, x: jax.Array, num_heads: int) -> jax.Array:
    """(batch, seq, D) -> (batch, seq, parts, heads, head_dim)."""
    y = dense.project(x, self.kernel[...].astype(self.dtype))
    y = y + self.bias[...].astype(self.dtype)
    return y.reshape(y.shape[:3] + (num_heads, y.shape[-1] // num_heads))


class JointBlock(nnx.Module):
  """One MMDiT block over (text, image) streams; see the module docstring."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, qk_norm: str | None,
               context_pre_only: bool = False, dual_attention: bool = False,
               attention_impl: str = "xla", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.context_pre_only = context_pre_only
    self.dual_attention = dual_attention
    self.attention_impl = attention_impl
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm_kw = dict(dtype=dtype, param_dtype=param_dtype)
    head_dim = width // num_heads
    qk = qk_norm == "rms_norm"

    self.img_modulation = Modulation(width, 9 if dual_attention else 6, **kw)
    self.img_qkv = Projection(width, 3, **kw)
    self.img_q_norm = RMSNorm(head_dim, **norm_kw) if qk else None
    self.img_k_norm = RMSNorm(head_dim, **norm_kw) if qk else None
    self.img_out = _dense(width, width, ("heads", "embed"), **kw)
    self.img_mlp = Mlp(width, mlp_dim, mlp_type="gelu_tanh", **kw)

    # The last block's text stream only feeds keys/values (its queries and outputs are unused).
    self.txt_modulation = Modulation(width, 2 if context_pre_only else 6, **kw)
    self.txt_qkv = Projection(width, 2 if context_pre_only else 3, **kw)
    self.txt_q_norm = RMSNorm(head_dim, **norm_kw) if qk and not context_pre_only else None
    self.txt_k_norm = RMSNorm(head_dim, **norm_kw) if qk else None
    if context_pre_only:
      self.txt_out = self.txt_mlp = None
    else:
      self.txt_out = _dense(width, width, ("heads", "embed"), **kw)
      self.txt_mlp = Mlp(width, mlp_dim, mlp_type="gelu_tanh", **kw)

    if dual_attention:
      self.attn2_qkv = Projection(width, 3, **kw)
      self.attn2_q_norm = RMSNorm(head_dim, **norm_kw) if qk else None
      self.attn2_k_norm = RMSNorm(head_dim, **norm_kw) if qk else None
      self.attn2_out = _dense(width, width, ("heads", "embed"), **kw)
    else:
      self.attn2_qkv = self.attn2_q_norm = self.attn2_k_norm = self.attn2_out = None

  @staticmethod
  def _norm(norm, x):
    return x if norm is None else norm(x)

  def _attend(self, q, k, v, mask):
    out = dot_product_attention(q, k, v, mask=mask, impl=self.attention_impl)
    return out.reshape(out.shape[:2] + (-1,))

  def __call__(self, txt: jax.Array, img: jax.Array, cond_act: jax.Array,
               mask: jax.Array | None) -> tuple[jax.Array | None, jax.Array]:
    """txt (batch, T, D), img (batch, I, D), cond_act = silu(cond) (batch, D), mask over the
    joint [text, image] sequence (see `joint_attention_mask`). Returns (txt or None, img)."""
    text_len = txt.shape[1]
    img_mod = self.img_modulation(cond_act)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = img_mod[:6]
    img_normed = _layer_norm(img)
    img_in = img_normed * (1 + scale_msa) + shift_msa
    iq, ik, iv = unstack(self.img_qkv(img_in, self.num_heads), 2)
    iq, ik = self._norm(self.img_q_norm, iq), self._norm(self.img_k_norm, ik)

    if self.context_pre_only:
      c_scale, c_shift = self.txt_modulation(cond_act)
      tk, tv = unstack(self.txt_qkv(_modulate(txt, c_shift, c_scale), self.num_heads), 2)
      tk = self._norm(self.txt_k_norm, tk)
      rows = mask if mask is None or mask.shape[2] == 1 else mask[:, :, text_len:]
      img_attn = self._attend(iq, jnp.concatenate([tk, ik], 1), jnp.concatenate([tv, iv], 1),
                              rows)
      txt_attn = None
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
          self.txt_modulation(cond_act)
      tq, tk, tv = unstack(
          self.txt_qkv(_modulate(txt, c_shift_msa, c_scale_msa), self.num_heads), 2)
      tq, tk = self._norm(self.txt_q_norm, tq), self._norm(self.txt_k_norm, tk)
      attn = self._attend(jnp.concatenate([tq, iq], 1), jnp.concatenate([tk, ik], 1),
                          jnp.concatenate([tv, iv], 1), mask)
      txt_attn, img_attn = jnp.split(attn, [text_len], axis=1)

    img = img + gate_msa * self.img_out(img_attn)
    if self.dual_attention:
      shift_msa2, scale_msa2, gate_msa2 = img_mod[6:]
      q2, k2, v2 = unstack(
          self.attn2_qkv(img_normed * (1 + scale_msa2) + shift_msa2, self.num_heads), 2)
      q2, k2 = self._norm(self.attn2_q_norm, q2), self._norm(self.attn2_k_norm, k2)
      img_mask = None
      if mask is not None:
        img_mask = mask[..., text_len:] if mask.shape[2] == 1 else mask[:, :, text_len:, text_len:]
      img = img + gate_msa2 * self.attn2_out(self._attend(q2, k2, v2, img_mask))
    img = img + gate_mlp * self.img_mlp(_modulate(img, shift_mlp, scale_mlp))
    img = constrain(img, ("batch", "seq", "act_embed"))

    if self.context_pre_only:
      return None, img
    txt = txt + c_gate_msa * self.txt_out(txt_attn)
    txt = txt + c_gate_mlp * self.txt_mlp(_modulate(txt, c_shift_mlp, c_scale_mlp))
    return constrain(txt, ("batch", "seq", "act_embed")), img


def block_runs(flags: list[bool]) -> list[tuple[int, int, bool]]:
  """Maximal runs of equal flags as (start, length, flag)."""
  runs = []
  for i, flag in enumerate(flags):
    if runs and runs[-1][2] == flag:
      runs[-1] = (runs[-1][0], runs[-1][1] + 1, flag)
    else:
      runs.append((i, 1, flag))
  return runs


def to_scanned_params(flat: dict[str, Any], config: MMDiTConfig) -> dict[str, Any]:
  """Maps flat unscanned parameter names (`blocks.<i>.<name>`) to the scanned layout
  (`block_groups.<g>.<name>`, arrays stacked on a new leading axis); other names pass through.
  A group entry is None if any of its layers' arrays is None."""
  dual = [i in config.dual_attention_layers for i in range(config.num_layers - 1)]
  out = {k: v for k, v in flat.items() if not k.startswith("blocks.")}
  for g, (start, length, _) in enumerate(block_runs(dual)):
    names = {k.split(".", 2)[2] for k in flat if k.startswith(f"blocks.{start}.")}
    for name in sorted(names):
      arrays = [flat.get(f"blocks.{start + j}.{name}") for j in range(length)]
      out[f"block_groups.{g}.{name}"] = (
          None if any(a is None for a in arrays) else np.stack([np.asarray(a) for a in arrays]))
  return out


class MMDiT(nnx.Module):
  """The MMDiT generator; `__call__` follows diffusers' SD3Transformer2DModel with NHWC latents.

  scan_layers stacks runs of identical blocks and runs them with `nnx.scan` (same outputs as
  the unrolled list); remat_policy, a name from `psvae_jax.models.remat` ('' or None: none),
  recomputes block activations in the backward pass under that policy.
  """

  def __init__(self, config: MMDiTConfig, *, scan_layers: bool = False,
               remat_policy: str | None = None, attention_impl: str = "xla",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    remat_policy = remat_lib.policy_name(remat_policy, what="remat_policy")
    self.config = config
    self.scan_layers = scan_layers
    self.remat_policy = remat_policy
    self.dtype = dtype
    c = config
    width = c.width
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    self.patch_embed = PatchEmbed(c.patch_size, c.in_channels, width, **kw)
    if c.pos_embed == "learned":
      table = sincos_pos_embed_2d(width, c.pos_grid, c.pos_grid, c.base_grid)
      self.pos_embed = nnx.Param(jnp.asarray(table, param_dtype), out_sharding=(None, "embed"))
    else:
      self.pos_embed = None
    self.source_embedding = (
        nnx.Param(0.02 * jax.random.normal(rngs.params(), (width,), param_dtype),
                  out_sharding=("embed",)) if c.edit else None)
    self.edit_positions = (
        nnx.Param(c.edit_position_std * jax.random.normal(
            rngs.params(), (c.pos_grid * c.pos_grid, width), param_dtype),
                  out_sharding=(None, "embed")) if c.edit and c.edit_position_std > 0 else None)
    self.time_fc1 = _dense(c.timestep_embed_dim, width, (None, "embed"), init="normal", **kw)
    self.time_fc2 = _dense(width, width, ("embed", None), init="normal", **kw)
    self.pooled_fc1 = _dense(c.pooled_dim, width, (None, "embed"), **kw)
    self.pooled_fc2 = _dense(width, width, ("embed", None), **kw)
    self.context_embedder = _dense(c.text_dim, width, (None, "embed"), **kw)

    block_kw = dict(qk_norm=c.qk_norm, attention_impl=attention_impl, dtype=dtype,
                    param_dtype=param_dtype)
    dual = [i in c.dual_attention_layers for i in range(c.num_layers - 1)]
    if scan_layers:
      self.blocks = None
      self.block_groups = nnx.List([self._stacked_blocks(length, flag, block_kw, rngs)
                                    for _, length, flag in block_runs(dual)])
    else:
      self.block_groups = None
      self.blocks = nnx.List([
          JointBlock(width, c.num_heads, c.mlp_dim, dual_attention=flag, rngs=rngs, **block_kw)
          for flag in dual])
    self.last_block = JointBlock(width, c.num_heads, c.mlp_dim, context_pre_only=True,
                                 dual_attention=(c.num_layers - 1) in c.dual_attention_layers,
                                 rngs=rngs, **block_kw)
    patch_out = c.patch_size ** 2 * c.out_dim
    if c.ddt_head is not None:
      self.ddt_head = DDTHead(width, c.patch_size ** 2 * c.in_channels, patch_out, c.ddt_head,
                              attention_impl=attention_impl, scan_layers=scan_layers, **kw)
      self.norm_out = self.proj_out = None
    else:
      self.ddt_head = None
      self.norm_out = Modulation(width, 2, **kw)
      self.proj_out = _dense(width, patch_out, ("embed", None), init="zeros", **kw)

  def _stacked_blocks(self, length, dual, block_kw, rngs):
    c = self.config
    make = lambda r: JointBlock(c.width, c.num_heads, c.mlp_dim, dual_attention=dual, rngs=r,
                                **block_kw)
    return stacked_layers(make, length, rngs)

  # ---- embeddings -------------------------------------------------------------------------

  def _positions(self, grid_h: int, grid_w: int) -> jax.Array:
    c = self.config
    if self.pos_embed is not None:
      return crop_pos_grid(self.pos_embed[...], c.pos_grid, grid_h, grid_w)
    if c.pos_embed_max_size is not None:
      side = c.pos_embed_max_size
      table = sincos_pos_embed_2d(c.width, side, side, c.base_grid)
      return crop_pos_grid(jnp.asarray(table), side, grid_h, grid_w)
    return jnp.asarray(sincos_pos_embed_2d(c.width, grid_h, grid_w, c.base_grid))

  def _grid(self, latents: jax.Array, what: str) -> tuple[int, int]:
    c = self.config
    if latents.ndim != 4 or latents.shape[-1] != c.in_channels:
      raise ValueError(f"{what} must be NHWC with {c.in_channels} channels, got {latents.shape}")
    h, w = latents.shape[1:3]
    if h % c.patch_size or w % c.patch_size:
      raise ValueError(f"{what} size {h}x{w} is not divisible by patch size {c.patch_size}")
    return h // c.patch_size, w // c.patch_size

  def _embed_image(self, latents: jax.Array, grid: tuple[int, int]) -> jax.Array:
    tokens = self.patch_embed(latents).reshape(latents.shape[0], grid[0] * grid[1], -1)
    tokens = tokens + self._positions(*grid).astype(self.dtype)
    if self.edit_positions is not None:
      codes = crop_pos_grid(self.edit_positions[...], self.config.pos_grid, *grid)
      tokens = tokens + codes.astype(self.dtype)
    return tokens

  def _patchify(self, latents: jax.Array) -> jax.Array:
    b, h, w, ch = latents.shape
    p = self.config.patch_size
    x = latents.reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * ch)

  def _unpatchify(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    p, ch = self.config.patch_size, self.config.out_dim
    x = tokens.reshape(tokens.shape[0], grid[0], grid[1], p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(tokens.shape[0], grid[0] * p, grid[1] * p, ch)

  # ---- blocks -----------------------------------------------------------------------------

  def _run_blocks(self, txt, img, cond_act, mask):
    def body(block, carry):
      # materialize_grad: see psvae_jax.models.grad_barrier (XLA:CPU backward fusion)
      return block(*materialize_grad(carry), cond_act, mask)

    body = remat_lib.nnx_checkpoint(body, self.remat_policy)
    carry = (txt, img)
    if self.scan_layers:
      for group in self.block_groups:
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(block, carry):
          return body(block, carry)
        carry = run(group, carry)
    else:
      for block in self.blocks:
        carry = body(block, carry)
    return body(self.last_block, carry)[1]

  # ---- forward ----------------------------------------------------------------------------

  def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array,
               pooled_projections: jax.Array, timestep: jax.Array, *,
               text_mask: jax.Array | None = None, source_latents: jax.Array | None = None,
               source_mask: jax.Array | None = None) -> jax.Array:
    """The velocity for the target latents, NHWC float32 (diffusers' `.sample`, transposed).

    Args:
      hidden_states: (batch, H, W, C) noisy target latents.
      encoder_hidden_states: (batch, T, text_dim) text encoder states.
      pooled_projections: (batch, pooled_dim) pooled text vector.
      timestep: (batch,) or scalar, diffusers' scale: t * 1000 (t = 1 is noise).
      text_mask: (batch, T), True/1 for real tokens; padded tokens are hidden from attention.
      source_latents: (batch, Hs, Ws, C) clean source latents (editing; needs config.edit).
      source_mask: (batch,) True where the source is present; False hides it from attention
        (the output then equals a call without source_latents).
    """
    c = self.config
    batch = hidden_states.shape[0]
    grid = self._grid(hidden_states, "hidden_states")
    num_target = grid[0] * grid[1]
    img = self._embed_image(hidden_states.astype(self.dtype), grid)
    image_key_mask = None
    if source_latents is not None:
      if self.source_embedding is None:
        raise ValueError("source_latents given but the model was built with config.edit=False")
      source_grid = self._grid(source_latents, "source_latents")
      src = self._embed_image(source_latents.astype(self.dtype), source_grid)
      src = src + self.source_embedding[...].astype(self.dtype)
      img = jnp.concatenate([img, src], axis=1)
      if source_mask is not None:
        present = jnp.broadcast_to(jnp.asarray(source_mask).astype(bool), (batch,))
        image_key_mask = jnp.concatenate(
            [jnp.ones((batch, num_target), bool),
             jnp.broadcast_to(present[:, None], (batch, src.shape[1]))], axis=1)
    elif source_mask is not None:
      raise ValueError("source_mask given without source_latents")
    img = constrain(img, ("batch", "seq", "act_embed"))

    timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
    time_emb = self.time_fc2(jax.nn.silu(self.time_fc1(
        timestep_embedding(timestep, c.timestep_embed_dim).astype(self.dtype))))
    pooled_emb = self.pooled_fc2(jax.nn.silu(self.pooled_fc1(
        pooled_projections.astype(self.dtype))))
    cond_act = jax.nn.silu(time_emb + pooled_emb)
    txt = self.context_embedder(encoder_hidden_states.astype(self.dtype))
    txt = constrain(txt, ("batch", "seq", "act_embed"))

    if text_mask is not None and text_mask.shape != txt.shape[:2]:
      raise ValueError(f"text_mask shape {text_mask.shape} does not match the text tokens "
                       f"{txt.shape[:2]}")
    mask = joint_attention_mask(txt.shape[1], img.shape[1], text_mask=text_mask,
                                image_key_mask=image_key_mask, causal_text=c.causal_text)
    img = self._run_blocks(txt, img, cond_act, mask)[:, :num_target]

    if self.ddt_head is not None:
      out = self.ddt_head(self._patchify(hidden_states.astype(self.dtype)), img, time_emb, grid)
    else:
      scale, shift = self.norm_out(cond_act)
      out = self.proj_out(_modulate(img, shift, scale))
    return self._unpatchify(out, grid).astype(jnp.float32)

  def velocity(self, x_t: jax.Array, t: jax.Array, text_states: jax.Array,
               pooled: jax.Array, **kwargs) -> jax.Array:
    """The flow velocity with t in [0, 1] (`psvae_jax.flow` convention); kwargs as __call__."""
    return self(x_t, text_states, pooled, jnp.asarray(t, jnp.float32) * TIMESTEP_SCALE,
                **kwargs)
