"""Qwen2-family decoder used as a frozen text encoder: returns the last layer's hidden states
after the final RMSNorm (transformers' `Qwen2Model(...).last_hidden_state`).

Architecture: token embedding, N pre-norm decoder layers (RMSNorm, grouped-query attention with
q/k/v biases and rotary position embeddings, SwiGLU MLP without biases), final RMSNorm. The
attention mask is causal combined with the padding mask (right padding: real tokens first);
position ids are 0..T-1 for every row, as transformers uses when no position_ids are given.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.models.attention import dot_product_attention
from psvae_jax.models.attention_mask import AttentionMask
from psvae_jax.models.vit import apply_layers, stacked_layers
from psvae_jax.models import dense
from psvae_jax.sharding import constrain

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """Shape of a Qwen2 decoder. `layer_types` per layer: 'full_attention' or
  'sliding_attention' (keys within `sliding_window` positions of the query)."""
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  head_dim: int | None = None
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None

  def __post_init__(self):
    if self.head_dim is None:
      if self.width % self.num_heads:
        raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
      object.__setattr__(self, "head_dim", self.width // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    layer_types = tuple(self.layer_types or ("full_attention",) * self.depth)
    if len(layer_types) != self.depth or set(layer_types) - set(LAYER_TYPES):
      raise ValueError(f"layer_types must list {self.depth} entries from {LAYER_TYPES}, got "
                       f"{layer_types}")
    if "sliding_attention" in layer_types and not self.sliding_window:
      raise ValueError("sliding_attention layers need a sliding_window")
    object.__setattr__(self, "layer_types", layer_types)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["layer_types"] = list(self.layer_types)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "TextEncoderConfig":
    d = dict(d)
    if d.get("layer_types") is not None:
      d["layer_types"] = tuple(d["layer_types"])
    return cls(**d)


PRESETS: dict[str, TextEncoderConfig] = {
    "qwen2.5-0.5b": TextEncoderConfig(vocab_size=151936, width=896, depth=24, num_heads=14,
                                      num_kv_heads=2, mlp_dim=4864, rope_theta=1_000_000.0),
    "qwen2.5-1.5b": TextEncoderConfig(vocab_size=151936, width=1536, depth=28, num_heads=12,
                                      num_kv_heads=2, mlp_dim=8960, rope_theta=1_000_000.0),
    "tiny": TextEncoderConfig(vocab_size=512, width=64, depth=2, num_heads=4, num_kv_heads=2,
                              mlp_dim=128, rope_theta=10_000.0),
    # The smallest shape that still has every part of the model (checkpoint fixtures).
    "micro": TextEncoderConfig(vocab_size=512, width=8, depth=1, num_heads=2, num_kv_heads=1,
                               mlp_dim=16, rope_theta=10_000.0),
}


def _init(names, init=None):
  return nnx.with_partitioning(init or nnx.initializers.lecun_normal(), names)


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back, then times a learned scale (Qwen2)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def rotary_cos_sin(positions: jax.Array, head_dim: int, theta: float):
  """cos, sin of shape positions.shape + (head_dim,), halves duplicated (rotate-half form)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: (batch, seq, heads, head_dim); cos/sin: (seq, head_dim)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, None, :].astype(x.dtype)
  sin = sin[:, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def layer_masks(attention_mask: jax.Array | None, seq: int,
                sliding_window: int | None = None) -> dict[str, AttentionMask]:
  """Per layer type: causal (& within `sliding_window`) & key is a real token (attention_mask
  (batch, seq), 1 = token); a static pattern and the key validity (`AttentionMask`)."""
  pos = np.arange(seq)
  causal = pos[None, :] <= pos[:, None]
  keys = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  out = {"full_attention": AttentionMask(keys, causal, kv_len=seq)}
  if sliding_window:
    window = pos[None, :] > pos[:, None] - sliding_window
    out["sliding_attention"] = AttentionMask(keys, causal & window, kv_len=seq)
  return out


class DecoderLayer(nnx.Module):
  """Pre-norm Qwen2 decoder layer."""

  def __init__(self, config: TextEncoderConfig, *, attention_impl: str = "xla",
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    c = config
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.attention_impl = attention_impl
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    zeros = nnx.initializers.zeros
    self.input_norm = RMSNorm(c.width, eps=c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.q = dense.Linear(c.width, q_dim, kernel_init=_init(("embed", "heads")),
                        bias_init=_init(("heads",), zeros), **kw)
    self.k = dense.Linear(c.width, kv_dim, kernel_init=_init(("embed", "kv_heads")),
                        bias_init=_init(("kv_heads",), zeros), **kw)
    self.v = dense.Linear(c.width, kv_dim, kernel_init=_init(("embed", "kv_heads")),
                        bias_init=_init(("kv_heads",), zeros), **kw)
    self.o = dense.Linear(q_dim, c.width, use_bias=False, kernel_init=_init(("heads", "embed")), **kw)
    self.post_attn_norm = RMSNorm(c.width, eps=c.rms_norm_eps, dtype=dtype,
                                  param_dtype=param_dtype)
    self.gate = dense.Linear(c.width, c.mlp_dim, use_bias=False, kernel_init=_init(("embed", "mlp")),
                           **kw)
    self.up = dense.Linear(c.width, c.mlp_dim, use_bias=False, kernel_init=_init(("embed", "mlp")),
                         **kw)
    self.down = dense.Linear(c.mlp_dim, c.width, use_bias=False,
                           kernel_init=_init(("mlp", "embed")), **kw)

  def __call__(self, x, cos, sin, mask):
    batch, seq, _ = x.shape
    h = self.input_norm(x)
    q = self.q(h).reshape(batch, seq, self.num_heads, self.head_dim)
    k = self.k(h).reshape(batch, seq, self.num_kv_heads, self.head_dim)
    v = self.v(h).reshape(batch, seq, self.num_kv_heads, self.head_dim)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    a = dot_product_attention(q, k, v, mask=mask, impl=self.attention_impl)
    x = x + self.o(a.reshape(batch, seq, self.num_heads * self.head_dim))
    h = self.post_attn_norm(x)
    x = x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))
    return constrain(x, ("batch", "seq", "act_embed"))


class TextEncoder(nnx.Module):
  """Qwen2 decoder as a text encoder: `(input_ids, attention_mask) -> last_hidden_state`."""

  def __init__(self, config: TextEncoderConfig, *, attention_impl: str = "xla",
               scan_layers: bool = False, remat: bool = False, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    c = config
    self.config = config
    self.dtype = dtype
    self.scan_layers = scan_layers
    self.remat = remat
    if scan_layers and len(set(c.layer_types)) > 1:
      raise ValueError("scan_layers needs every layer to have the same attention type; got "
                       f"{sorted(set(c.layer_types))}")
    self.embed = nnx.Embed(c.vocab_size, c.width, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=_init(("vocab", "embed"),
                                                nnx.initializers.normal(0.02)), rngs=rngs)
    make = lambda r: DecoderLayer(c, attention_impl=attention_impl, dtype=dtype,
                                  param_dtype=param_dtype, rngs=r)
    if scan_layers:
      self.layers = stacked_layers(make, c.depth, rngs)
    else:
      self.layers = nnx.List([make(rngs) for _ in range(c.depth)])
    self.norm = RMSNorm(c.width, eps=c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)

  @property
  def width(self) -> int:
    return self.config.width

  def masks(self, attention_mask: jax.Array | None, batch: int,
            seq: int) -> dict[str, AttentionMask]:
    """Masks (batch, 1, seq, seq) per layer type (see `layer_masks`)."""
    del batch  # the masks broadcast over it without attention_mask
    return layer_masks(attention_mask, seq, self.config.sliding_window)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """input_ids (batch, seq) int; attention_mask (batch, seq), 1 = token, 0 = padding.

    Returns (batch, seq, width). Rows at padded positions are computed but meaningless.
    """
    c = self.config
    batch, seq = input_ids.shape
    x = self.embed(input_ids)
    cos, sin = rotary_cos_sin(jnp.arange(seq), c.head_dim, c.rope_theta)
    masks = self.masks(attention_mask, batch, seq)
    if self.scan_layers:
      mask = masks[c.layer_types[0]]
      x = apply_layers(self.layers, x, lambda layer, h: layer(h, cos, sin, mask), scanned=True,
                       remat=self.remat)
    else:
      for layer, layer_type in zip(self.layers, c.layer_types):
        mask = masks[layer_type]
        x = apply_layers([layer], x, lambda l, h, m=mask: l(h, cos, sin, m), scanned=False,
                         remat=self.remat)
    return self.norm(x)


def build_text_encoder(name_or_config: str | TextEncoderConfig, *, rngs: nnx.Rngs,
                       dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                       attention_impl: str = "xla", scan_layers: bool = False,
                       remat: bool = False) -> TextEncoder:
  """A randomly initialised TextEncoder from a preset name (see PRESETS) or a config."""
  if isinstance(name_or_config, str):
    if name_or_config not in PRESETS:
      raise ValueError(f"unknown text encoder preset {name_or_config!r}; known: "
                       f"{sorted(PRESETS)}")
    config = PRESETS[name_or_config]
  else:
    config = name_or_config
  return TextEncoder(config, attention_impl=attention_impl, scan_layers=scan_layers,
                     remat=remat, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
