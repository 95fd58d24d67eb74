"""RAE's wide DDT head (DiT^DH): a few wide transformer blocks that refine a backbone's image
tokens into the velocity, conditioned per token.

Data flow (per image token, following RAE's `DiTwDDTHead`):
  c = proj(silu(backbone_token + timestep_embedding))      per-token condition, head width
  h = embed(noisy input patch)                             the noisy input, re-embedded
  h = blocks(h, c)       adaLN (shift/scale/gate from silu(c), zero-init), RMSNorm with scale,
                         SwiGLU MLP, 2D rotary position embedding on q/k (RAE's `use_rope`)
  out = linear(modulate(rmsnorm(h), c))                    zero-init: the head starts at 0

Parameter layout (logical axis names in brackets):
  cond_proj.{kernel,bias}        (cond_dim, width)      [None, embed]
  x_embed.{kernel,bias}          (in_features, width)   [None, embed]
  blocks.<i>.norm1.scale, norm2.scale                   [norm]   (scan_layers: `blocks.*`
                                                        stacked on a leading [layers] axis)
  blocks.<i>.qkv_kernel (width, 3, width), qkv_bias     [embed, None, heads]
  blocks.<i>.out.{kernel,bias}                          [heads, embed]
  blocks.<i>.mlp.{gate,up,down}                         SwiGLU [embed, mlp] / [mlp, embed]
  blocks.<i>.modulation.{kernel,bias} (width, 6*width)  [embed, mlp]   zero-init
  final_norm.scale, final_modulation (width, 2*width) zero-init, final_linear zero-init
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.models.attention import dot_product_attention, unstack
from psvae_jax.models.vit import Mlp, apply_layers, stacked_layers
from psvae_jax.models import dense
from psvae_jax.sharding import constrain

Dtype = Any


@dataclasses.dataclass(frozen=True)
class DDTHeadConfig:
  """Shape of the head. RAE's default: 2 blocks of width 2048, 16 heads, SwiGLU of 2/3 * 4 *
  width, 2D RoPE, no qk norm."""
  width: int = 2048
  depth: int = 2
  num_heads: int = 16
  mlp_ratio: float = 4.0
  rope: bool = True
  rope_theta: float = 10000.0

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"DDT head width {self.width} is not divisible by {self.num_heads} heads")
    if self.rope and (self.width // self.num_heads) % 4:
      raise ValueError(f"2D RoPE needs a head dim divisible by 4, got "
                       f"{self.width // self.num_heads}")

  @property
  def mlp_dim(self) -> int:
    """RAE's SwiGLU hidden width, int(2/3 * mlp_ratio * width)."""
    return int(2 / 3 * int(self.width * self.mlp_ratio))


def _linear(d_in, d_out, names, *, zero=False, dtype, param_dtype, rngs):
  kernel_init = nnx.initializers.zeros if zero else nnx.initializers.xavier_uniform()
  return dense.Linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.with_partitioning(kernel_init, names),
                      bias_init=nnx.with_partitioning(nnx.initializers.zeros, (names[1],)),
                      rngs=rngs)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the last axis; statistics in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


@functools.lru_cache(maxsize=32)
def rope_2d_tables(grid_h: int, grid_w: int, head_dim: int,
                   theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """cos/sin tables (grid_h * grid_w, head_dim) of RAE's 2D rotary embedding (row-major tokens).

  The first half of each head rotates with the row index, the second with the column index;
  within a half, frequencies theta^(-2j / (head_dim/2)) each cover an adjacent pair of channels.
  """
  half = head_dim // 2
  freqs = 1.0 / theta ** (np.arange(0, half, 2, dtype=np.float32) / half)  # (head_dim/4,)
  ang_h = np.repeat(np.arange(grid_h, dtype=np.float32)[:, None] * freqs, 2, axis=1)
  ang_w = np.repeat(np.arange(grid_w, dtype=np.float32)[:, None] * freqs, 2, axis=1)
  angles = np.concatenate([np.broadcast_to(ang_h[:, None], (grid_h, grid_w, half)),
                           np.broadcast_to(ang_w[None, :], (grid_h, grid_w, half))], axis=-1)
  angles = angles.reshape(grid_h * grid_w, head_dim)
  return np.cos(angles), np.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates adjacent channel pairs: (x0, x1) -> (x0 c - x1 s, x1 c + x0 s). x: (b, n, h, d)."""
  pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  cos = cos[None, :, None, :].astype(x.dtype)
  sin = sin[None, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


class DDTBlock(nnx.Module):
  """Pre-norm block with per-token adaLN-Zero modulation (6 chunks: shift, scale, gate for the
  attention and the MLP)."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, attention_impl: str = "xla",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.head_dim = width // num_heads
    self.attention_impl = attention_impl
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = RMSNorm(width, **kw)
    init = nnx.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
    self.qkv_kernel = nnx.Param(init(rngs.params(), (width, 3, width), param_dtype),
                                out_sharding=("embed", None, "heads"))
    self.qkv_bias = nnx.Param(jnp.zeros((3, width), param_dtype), out_sharding=(None, "heads"))
    self.out = _linear(width, width, ("heads", "embed"), rngs=rngs, **kw)
    self.norm2 = RMSNorm(width, **kw)
    self.mlp = Mlp(width, mlp_dim, mlp_type="swiglu", rngs=rngs, **kw)
    self.modulation = _linear(width, 6 * width, ("embed", "mlp"), zero=True, rngs=rngs, **kw)

  def __call__(self, x: jax.Array, cond_act: jax.Array,
               rope: tuple[jax.Array, jax.Array] | None, mask: jax.Array | None = None
               ) -> jax.Array:
    """x: (batch, n, width); cond_act: silu of the per-token condition, (batch, n, width)."""
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.modulation(cond_act), 6,
                                                             axis=-1)
    batch, seq, width = x.shape
    h = self.norm1(x) * (1 + scale1) + shift1
    qkv = dense.project(h, self.qkv_kernel[...].astype(self.dtype))
    qkv = (qkv + self.qkv_bias[...].astype(self.dtype)).reshape(
        batch, seq, 3, self.num_heads, self.head_dim)
    q, k, v = unstack(qkv, 2)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    attn = dot_product_attention(q, k, v, mask=mask, impl=self.attention_impl)
    x = x + gate1 * self.out(attn.reshape(batch, seq, width))
    x = x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
    return constrain(x, ("batch", "seq", "act_embed"))


class DDTHead(nnx.Module):
  """The wide head. `cond_dim` is the backbone width (tokens and timestep embedding),
  `in_features` the size of one noisy input patch (p*p*C), `out_features` of one output patch."""

  def __init__(self, cond_dim: int, in_features: int, out_features: int,
               config: DDTHeadConfig = DDTHeadConfig(), *, attention_impl: str = "xla",
               scan_layers: bool = False, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.scan_layers = scan_layers
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    width = config.width
    self.cond_proj = _linear(cond_dim, width, (None, "embed"), rngs=rngs, **kw)
    self.x_embed = _linear(in_features, width, (None, "embed"), rngs=rngs, **kw)
    make = lambda r: DDTBlock(width, config.num_heads, config.mlp_dim,
                              attention_impl=attention_impl, rngs=r, **kw)
    if scan_layers:
      self.blocks = stacked_layers(make, config.depth, rngs)
    else:
      self.blocks = nnx.List([make(rngs) for _ in range(config.depth)])
    self.final_norm = RMSNorm(width, **kw)
    self.final_modulation = _linear(width, 2 * width, ("embed", "mlp"), zero=True, rngs=rngs,
                                    **kw)
    self.final_linear = _linear(width, out_features, ("embed", None), zero=True, rngs=rngs, **kw)

  def __call__(self, noisy_patches: jax.Array, backbone_tokens: jax.Array,
               timestep_embedding: jax.Array, grid: tuple[int, int],
               mask: jax.Array | None = None) -> jax.Array:
    """Velocity patches (batch, n, out_features).

    Args:
      noisy_patches: (batch, n, in_features) the model's noisy input, patchified row-major.
      backbone_tokens: (batch, n, cond_dim) the backbone's image tokens for the same patches.
      timestep_embedding: (batch, cond_dim).
      grid: (grid_h, grid_w) with grid_h * grid_w = n (the RoPE positions).
      mask: optional attention mask among the n tokens (True = attend).
    """
    if grid[0] * grid[1] != noisy_patches.shape[1]:
      raise ValueError(f"grid {grid} does not match {noisy_patches.shape[1]} tokens")
    cond = backbone_tokens.astype(self.dtype) + timestep_embedding.astype(self.dtype)[:, None]
    cond = self.cond_proj(jax.nn.silu(cond))
    x = self.x_embed(noisy_patches.astype(self.dtype))
    rope = None
    if self.config.rope:
      cos, sin = rope_2d_tables(grid[0], grid[1], self.config.width // self.config.num_heads,
                                self.config.rope_theta)
      rope = (jnp.asarray(cos), jnp.asarray(sin))
    cond_act = jax.nn.silu(cond)
    x = apply_layers(self.blocks, x, lambda block, h: block(h, cond_act, rope, mask),
                     scanned=self.scan_layers, remat=False)
    shift, scale = jnp.split(self.final_modulation(cond_act), 2, axis=-1)
    return self.final_linear(self.final_norm(x) * (1 + scale) + shift)
