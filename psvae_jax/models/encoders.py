"""Representation encoders: DINOv2 (with or without registers, MLP or SwiGLU) and SigLIP vision
towers, plus the RAE feature recipe and pixel preprocessing in JAX.

`VisionEncoder(pixels)` takes NHWC float pixels already normalised with the encoder's mean/std
and returns the final-norm hidden states (batch, prefix + h*w, width), exactly what transformers
calls `last_hidden_state`. Token order: [CLS, registers..., patches...] for DINOv2 (prefix 1+R),
patches only for SigLIP (prefix 0).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from psvae_jax.models.resize import resize_bicubic
from psvae_jax.models.vit import (MLP_TYPES, PatchEmbed, TransformerStack, interpolate_pos_grid,
                                  swiglu_hidden_dim)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
FAMILIES = ("dinov2", "siglip")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Shape and conventions of a ViT representation encoder.

  family:            'dinov2' (CLS token, optional registers, layer scale) or 'siglip'
                     (patch tokens only, no layer scale).
  mlp_dim:           the MLP hidden width as stored in the weights (SwiGLU: already rounded).
  image_size:        resolution the position embeddings were trained at (a square grid of
                     (image_size // patch_size)**2 entries); other input sizes interpolate.
  pos_antialias:     bicubic position-embedding interpolation with antialias (transformers'
                     Dinov2WithRegisters does, Dinov2 and Siglip do not).
  image_mean/std:    the pixel normalisation the encoder was trained with.
  """
  family: str
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  image_size: int
  num_channels: int = 3
  num_register_tokens: int = 0
  mlp_type: str = "gelu"
  layer_scale_init: float | None = 1.0
  norm_eps: float = 1e-6
  qkv_bias: bool = True
  pos_antialias: bool = False
  image_mean: tuple[float, ...] = IMAGENET_MEAN
  image_std: tuple[float, ...] = IMAGENET_STD

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"unknown encoder family {self.family!r}; expected one of {FAMILIES}")
    if self.mlp_type not in MLP_TYPES:
      raise ValueError(f"unknown mlp_type {self.mlp_type!r}; expected one of {MLP_TYPES}")
    if self.family == "siglip" and self.num_register_tokens:
      raise ValueError("SigLIP encoders have no register tokens")
    # JSON round trips give lists; keep the dataclass hashable.
    object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
    object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

  @property
  def num_prefix_tokens(self) -> int:
    return (1 + self.num_register_tokens) if self.family == "dinov2" else 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "EncoderConfig":
    return cls(**d)


def _dinov2(width, depth, heads, *, registers=0, swiglu=False, image_size=518):
  return EncoderConfig(
      family="dinov2", width=width, depth=depth, num_heads=heads,
      mlp_dim=swiglu_hidden_dim(width, 4) if swiglu else 4 * width,
      mlp_type="swiglu" if swiglu else "gelu", patch_size=14, image_size=image_size,
      num_register_tokens=registers, pos_antialias=registers > 0)


def _siglip(width, depth, heads, mlp_dim, *, patch_size=14, image_size=224):
  return EncoderConfig(
      family="siglip", width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim,
      patch_size=patch_size, image_size=image_size, mlp_type="gelu_tanh", layer_scale_init=None,
      image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)


PRESETS: dict[str, EncoderConfig] = {
    "dinov2_s14": _dinov2(384, 12, 6),
    "dinov2_b14": _dinov2(768, 12, 12),
    "dinov2_l14": _dinov2(1024, 24, 16),
    "dinov2_g14": _dinov2(1536, 40, 24, swiglu=True),
    "dinov2_s14_reg": _dinov2(384, 12, 6, registers=4),
    "dinov2_b14_reg": _dinov2(768, 12, 12, registers=4),
    "dinov2_l14_reg": _dinov2(1024, 24, 16, registers=4),
    "dinov2_g14_reg": _dinov2(1536, 40, 24, registers=4, swiglu=True),
    # SigLIP / SigLIP2 fixed-resolution so400m/14 towers (same architecture, v1 weight format).
    "siglip_so400m14_224": _siglip(1152, 27, 16, 4304, image_size=224),
    "siglip_so400m14_384": _siglip(1152, 27, 16, 4304, image_size=384),
    "siglip2_so400m14": _siglip(1152, 27, 16, 4304, image_size=224),
    "siglip2_so400m14_224": _siglip(1152, 27, 16, 4304, image_size=224),
    # Tiny shapes for smoke runs and tests (not pretrained networks).
    "dinov2_tiny_reg": _dinov2(64, 2, 4, registers=4, image_size=224),
    "siglip_tiny": _siglip(64, 2, 4, 128, image_size=224),
    # The smallest shape that still has every part of the model (checkpoint fixtures): 2x2
    # patches of 8x8 images, 4x4 tokens.
    "dinov2_micro_reg": dataclasses.replace(_dinov2(8, 1, 2, registers=4, image_size=8),
                                            patch_size=2),
}
PRESETS["tiny"] = PRESETS["dinov2_tiny_reg"]
PRESETS["micro"] = PRESETS["dinov2_micro_reg"]


class VisionEncoder(nnx.Module):
  """A DINOv2 or SigLIP vision transformer; `__call__` returns transformers' last_hidden_state."""

  def __init__(self, config: EncoderConfig, *, attention_impl: str = "xla",
               scan_layers: bool = False, remat: bool = False, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    c = config
    self.patch_embed = PatchEmbed(c.patch_size, c.num_channels, c.width, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    grid = c.image_size // c.patch_size
    num_pos = grid * grid + (1 if c.family == "dinov2" else 0)
    self.pos_embed = nnx.Param(
        0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (num_pos, c.width),
                                           param_dtype), out_sharding=(None, "embed"))
    if c.family == "dinov2":
      self.cls_token = nnx.Param(jnp.zeros((c.width,), param_dtype), out_sharding=("embed",))
    else:
      self.cls_token = None
    if c.num_register_tokens:
      self.register_tokens = nnx.Param(jnp.zeros((c.num_register_tokens, c.width), param_dtype),
                                       out_sharding=(None, "embed"))
    else:
      self.register_tokens = None
    self.blocks = TransformerStack(
        c.depth, c.width, c.num_heads, c.mlp_dim, scan_layers=scan_layers, remat=remat,
        layer_scale_init=c.layer_scale_init, mlp_type=c.mlp_type, norm_eps=c.norm_eps,
        qkv_bias=c.qkv_bias, attention_impl=attention_impl, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(
        c.width, epsilon=c.norm_eps, dtype=dtype, param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nnx.with_partitioning(nnx.initializers.ones, ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("norm",)), rngs=rngs)

  # Properties the latent models read.
  @property
  def width(self) -> int:
    return self.config.width

  @property
  def patch_size(self) -> int:
    return self.config.patch_size

  @property
  def num_prefix_tokens(self) -> int:
    return self.config.num_prefix_tokens

  @property
  def image_mean(self) -> tuple[float, ...]:
    return self.config.image_mean

  @property
  def image_std(self) -> tuple[float, ...]:
    return self.config.image_std

  def grid_size(self, image_size: int | tuple[int, int] = 224) -> tuple[int, int]:
    """(h, w) of the patch-token grid for an input of `image_size` pixels."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return h // self.patch_size, w // self.patch_size

  def embed(self, pixels: jax.Array) -> jax.Array:
    """Patch + position embeddings with the prefix tokens: (batch, prefix + h*w, width)."""
    c = self.config
    x = self.patch_embed(pixels)
    batch, gh, gw, _ = x.shape
    x = x.reshape(batch, gh * gw, c.width)
    pos = self.pos_embed[...]
    if c.family == "dinov2":
      patch_pos = interpolate_pos_grid(pos[1:], (gh, gw), antialias=c.pos_antialias)
      cls = (self.cls_token[...] + pos[0]).astype(self.dtype)
      parts = [jnp.broadcast_to(cls, (batch, 1, c.width))]
      if self.register_tokens is not None:
        regs = self.register_tokens[...].astype(self.dtype)
        parts.append(jnp.broadcast_to(regs, (batch,) + regs.shape))
      parts.append(x + patch_pos.astype(self.dtype))
      return jnp.concatenate(parts, axis=1)
    patch_pos = interpolate_pos_grid(pos, (gh, gw), antialias=c.pos_antialias)
    return x + patch_pos.astype(self.dtype)

  def __call__(self, pixel_values: jax.Array, *, final_norm: bool = True) -> jax.Array:
    """NHWC normalised pixels -> hidden states (batch, prefix + h*w, width).

    final_norm=False returns the last block's output before the model's final LayerNorm.
    """
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.config.num_channels:
      raise ValueError(f"expected NHWC pixels with {self.config.num_channels} channels, got "
                       f"shape {pixel_values.shape}")
    x = self.blocks(self.embed(pixel_values))
    return self.norm(x) if final_norm else x


def build_encoder(name_or_config: str | EncoderConfig, *, rngs: nnx.Rngs,
                  dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                  attention_impl: str = "xla", scan_layers: bool = False,
                  remat: bool = False) -> VisionEncoder:
  """A VisionEncoder from a preset name (see PRESETS) or an EncoderConfig, randomly initialised."""
  if isinstance(name_or_config, str):
    if name_or_config not in PRESETS:
      raise ValueError(f"unknown encoder preset {name_or_config!r}; known: {sorted(PRESETS)}")
    config = PRESETS[name_or_config]
  elif isinstance(name_or_config, EncoderConfig):
    config = name_or_config
  else:
    raise TypeError(f"expected a preset name or EncoderConfig, got {type(name_or_config)}")
  return VisionEncoder(config, attention_impl=attention_impl, scan_layers=scan_layers,
                       remat=remat, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def rae_features(encoder: VisionEncoder, pixel_values: jax.Array) -> jax.Array:
  """The RAE representation: (batch, h, w, width) patch features of normalised NHWC pixels.

  RAE (bytetriper/RAE, `Dinov2withNorm`) runs transformers' Dinov2WithRegistersModel with the
  final LayerNorm's affine removed (weight and bias set to None) and drops the CLS + register
  tokens from `last_hidden_state`. Equivalently: the last block's output, normalised per token
  over channels (eps = the model's layer_norm_eps) with no learned scale/bias, prefix dropped.
  The model's own final-norm parameters are therefore unused here. Computed in float32.
  For 224 px input and patch 14 the result is (batch, 16, 16, width).
  """
  hidden = encoder(pixel_values, final_norm=False).astype(jnp.float32)
  hidden = hidden[:, encoder.num_prefix_tokens:]
  mean = hidden.mean(-1, keepdims=True)
  var = jnp.square(hidden - mean).mean(-1, keepdims=True)
  feats = (hidden - mean) * jax.lax.rsqrt(var + encoder.config.norm_eps)
  gh, gw = encoder.grid_size(pixel_values.shape[1:3])
  return feats.reshape(feats.shape[0], gh, gw, feats.shape[-1])


def preprocess_pixels(images: jax.Array, size: int | tuple[int, int] | None = 224, *,
                      mean: tuple[float, ...] = IMAGENET_MEAN,
                      std: tuple[float, ...] = IMAGENET_STD,
                      antialias: bool = False) -> jax.Array:
  """Images -> the encoder's normalised NHWC float32 input.

  images: uint8 NHWC in [0, 255] or float NHWC in [0, 1]. Resized to `size` (None: keep) with
  torch-compatible bicubic (align_corners=False; antialias=False reproduces RAE's
  `F.interpolate(x, size, mode='bicubic')`; antialias=True is closer to PIL/processor resizing),
  then (x - mean) / std per channel. Pass the encoder's own `image_mean`/`image_std` (SigLIP:
  0.5/0.5).
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"expected NHWC images, got shape {images.shape}")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  elif jnp.issubdtype(images.dtype, jnp.floating):
    x = images.astype(jnp.float32)
  else:
    raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
  if size is not None:
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[1:3]) != hw:
      x = resize_bicubic(x, hw, antialias=antialias)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  if mean.shape != (x.shape[-1],) or std.shape != (x.shape[-1],):
    raise ValueError(f"mean/std need one value per channel ({x.shape[-1]}), got {mean.shape}, "
                     f"{std.shape}")
  return (x - mean) / std
