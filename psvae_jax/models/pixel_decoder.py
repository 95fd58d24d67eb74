"""The LDM convolutional pixel decoder (Rombach et al. 2022), NHWC.

latent z (B, h, w, z_channels) -> [post_quant_conv 1x1] -> conv_in 3x3 -> mid block
(ResNet, single-head self-attention, ResNet) -> up blocks, lowest resolution first, each with
`num_res_blocks + 1` ResNet blocks (self-attention after each one at the resolutions listed in
`attn_resolutions`) and, except the last, a nearest 2x upsample + 3x3 conv -> GroupNorm + SiLU ->
conv_out 3x3 -> image (B, h * 2**(levels-1), w * 2**(levels-1), out_ch).

Normalisation is GroupNorm(norm_groups, eps 1e-6) followed by SiLU everywhere, as in LDM and
diffusers' `AutoencoderKL` decoder. The default is LDM's kl-f16 shape used by PS-VAE: ch 128,
ch_mult (1, 1, 2, 2, 4), 2 res blocks, attention at 16x16, z 16x16x96 -> image 256x256x3.

Parameter layout mirrors diffusers' `Decoder` (up blocks in decode order, lowest resolution
first), so a diffusers checkpoint maps name for name (see `psvae_jax.ports.diffusers`):
  post_quant_conv.{kernel,bias}                       optional 1x1 z -> z
  conv_in.{kernel,bias}
  mid_block.resnets.{0,1}.{norm1,conv1,norm2,conv2}
  mid_block.attention.{group_norm,to_q,to_k,to_v,to_out}
  up_blocks.<i>.resnets.<j>.{norm1,conv1,norm2,conv2,conv_shortcut}
  up_blocks.<i>.attentions.<j>.<as mid attention>     only at attention resolutions
  up_blocks.<i>.upsampler.conv                        all but the last up block
  conv_norm_out, conv_out
Conv kernels are (kh, kw, in, out) with logical axes (None, None, None, 'conv_out').
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from psvae_jax.models import remat as remat_lib
from psvae_jax.models.attention import dot_product_attention
from psvae_jax.sharding import IMAGE_AXES, constrain

Dtype = Any

def _init(names, init=None):
  return nnx.with_partitioning(init or nnx.initializers.lecun_normal(), names)


def conv(in_ch: int, out_ch: int, kernel_size: int, *, dtype, param_dtype, rngs) -> nnx.Conv:
  """Stride-1 'same' convolution (torch padding=k//2) with partitioned kernel."""
  pad = kernel_size // 2
  return nnx.Conv(in_ch, out_ch, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)),
                  dtype=dtype, param_dtype=param_dtype,
                  kernel_init=_init((None, None, None, "conv_out")),
                  bias_init=_init((None,), nnx.initializers.zeros), rngs=rngs)


def group_norm(channels: int, groups: int, *, dtype, param_dtype, rngs) -> nnx.GroupNorm:
  """GroupNorm with eps 1e-6; statistics are computed in float32 even for bf16 compute."""
  if channels % groups:
    raise ValueError(f"GroupNorm: {channels} channels are not divisible by {groups} groups")
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-6, use_fast_variance=False,
                       dtype=dtype, param_dtype=param_dtype,
                       scale_init=_init(("norm",), nnx.initializers.ones),
                       bias_init=_init(("norm",), nnx.initializers.zeros), rngs=rngs)


class ResnetBlock(nnx.Module):
  """norm1-SiLU-conv1-norm2-SiLU-conv2 plus a (1x1-projected when widths differ) shortcut."""

  def __init__(self, in_ch: int, out_ch: int, *, norm_groups: int = 32, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = group_norm(in_ch, norm_groups, **kw)
    self.conv1 = conv(in_ch, out_ch, 3, **kw)
    self.norm2 = group_norm(out_ch, norm_groups, **kw)
    self.conv2 = conv(out_ch, out_ch, 3, **kw)
    self.conv_shortcut = conv(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    return shortcut + h


class SpatialSelfAttention(nnx.Module):
  """Single-head self-attention over all h*w positions, pre-GroupNorm, residual."""

  def __init__(self, channels: int, *, norm_groups: int = 32, attention_impl: str = "xla",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.attention_impl = attention_impl
    self.group_norm = group_norm(channels, norm_groups, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)

    def linear(names):
      return nnx.Linear(channels, channels, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=_init(names),
                        bias_init=_init((names[1],), nnx.initializers.zeros), rngs=rngs)

    self.to_q = linear(("embed", "heads"))
    self.to_k = linear(("embed", "heads"))
    self.to_v = linear(("embed", "heads"))
    self.to_out = linear(("heads", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, 1, c)
    q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
    out = dot_product_attention(q, k, v, impl=self.attention_impl)
    return x + self.to_out(out).reshape(b, h, w, c)


class Upsample(nnx.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

  def __init__(self, channels: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class MidBlock(nnx.Module):
  """ResNet, optional self-attention, ResNet at the lowest resolution."""

  def __init__(self, channels: int, *, attention: bool = True, norm_groups: int = 32,
               attention_impl: str = "xla", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(norm_groups=norm_groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(channels, channels, **kw) for _ in range(2)])
    self.attention = (SpatialSelfAttention(channels, attention_impl=attention_impl, **kw)
                      if attention else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attention is not None:
      x = self.attention(x)
    return self.resnets[1](x)


class UpBlock(nnx.Module):
  """`num_layers` ResNet blocks (each optionally followed by attention), then an optional
  upsampler."""

  def __init__(self, in_ch: int, out_ch: int, num_layers: int, *, attention: bool,
               upsample: bool, norm_groups: int = 32, attention_impl: str = "xla",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(norm_groups=norm_groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, **kw)
                             for i in range(num_layers)])
    self.attentions = (nnx.List([SpatialSelfAttention(out_ch, attention_impl=attention_impl, **kw)
                                 for _ in range(num_layers)]) if attention else None)
    self.upsampler = (Upsample(out_ch, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                      if upsample else None)


def _apply(block: nnx.Module, x: jax.Array) -> jax.Array:
  return block(x)


class PixelDecoder(nnx.Module):
  """LDM decoder: latent (B, h, w, z_channels) -> image (B, H, W, out_ch), NHWC.

  Args:
    z_channels: latent channels (96 for PS-VAE).
    out_ch: image channels.
    ch, ch_mult: level widths are ch * ch_mult[level]; level 0 is the full resolution.
    num_res_blocks: LDM's count; every up block has num_res_blocks + 1 ResNet blocks.
    attn_resolutions: resolutions (in pixels of the nominal `resolution` image) whose up block
      has self-attention after each ResNet block; level l has resolution // 2**l.
    resolution: nominal output size, only used to place attention (the network is fully
      convolutional: any latent size works, output = latent size * 2**(len(ch_mult) - 1)).
    use_post_quant_conv: a 1x1 z -> z conv first (diffusers' `use_post_quant_conv`).
    mid_attention: self-attention in the mid block (diffusers' `mid_block_add_attention`).
    norm_groups: GroupNorm groups (32).
    remat: rematerialise each block (mid block, every ResNet/attention/upsampler) in backprop:
      True = 'full', or a policy name from `psvae_jax.models.remat`.
    attention_impl: see `psvae_jax.models.attention`. The attention is single-head with
      head_dim = the level's width (512 for kl-f16, over 16x16 = 256 positions); 'xla' is the
      safe choice, cuDNN's fused kernel limits head_dim (128/256) and may reject it.
    dtype: compute dtype (bf16 option); params stay `param_dtype`. The output is float32.
  """

  def __init__(self, z_channels: int = 96, out_ch: int = 3, ch: int = 128,
               ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
               attn_resolutions: Sequence[int] = (16,), resolution: int = 256, *,
               use_post_quant_conv: bool = False, mid_attention: bool = True,
               norm_groups: int = 32, remat: bool | str = False, attention_impl: str = "xla",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    levels = len(ch_mult)
    if levels < 1:
      raise ValueError("ch_mult must name at least one level")
    level_res = [resolution // 2 ** level for level in range(levels)]
    unknown = sorted(set(attn_resolutions) - set(level_res))
    if unknown:
      raise ValueError(f"attn_resolutions {unknown} match no level of a {resolution}px decoder "
                       f"with {levels} levels (level resolutions {level_res})")
    self.z_channels = z_channels
    self.num_levels = levels
    self.remat = remat_lib.policy_name(remat)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_quant_conv = conv(z_channels, z_channels, 1, **kw) if use_post_quant_conv else None
    block_in = ch * ch_mult[-1]
    self.conv_in = conv(z_channels, block_in, 3, **kw)
    self.mid_block = MidBlock(block_in, attention=mid_attention, norm_groups=norm_groups,
                              attention_impl=attention_impl, **kw)
    up_blocks = []
    for i in range(levels):
      level = levels - 1 - i
      block_out = ch * ch_mult[level]
      up_blocks.append(UpBlock(block_in, block_out, num_res_blocks + 1,
                               attention=level_res[level] in attn_resolutions,
                               upsample=level != 0, norm_groups=norm_groups,
                               attention_impl=attention_impl, **kw))
      block_in = block_out
    self.up_blocks = nnx.List(up_blocks)
    self.conv_norm_out = group_norm(block_in, norm_groups, **kw)
    self.conv_out = conv(block_in, out_ch, 3, **kw)

  def _run(self, block: nnx.Module, x: jax.Array) -> jax.Array:
    return remat_lib.nnx_checkpoint(_apply, self.remat)(block, x)

  def decode_features(self, z: jax.Array) -> jax.Array:
    """Everything before `conv_out`: the activation after the final GroupNorm + SiLU.

    With `output_from_features` this lets a loss differentiate with respect to the last
    layer's kernel alone (LDM's adaptive GAN weight).
    """
    if z.ndim != 4 or z.shape[-1] != self.z_channels:
      raise ValueError(f"PixelDecoder expects NHWC latents with {self.z_channels} channels, got "
                       f"shape {z.shape}")
    x = z
    if self.post_quant_conv is not None:
      x = self.post_quant_conv(x)
    x = constrain(self.conv_in(x), IMAGE_AXES)
    x = self._run(self.mid_block, x)
    for up in self.up_blocks:
      for j, resnet in enumerate(up.resnets):
        x = self._run(resnet, x)
        if up.attentions is not None:
          x = self._run(up.attentions[j], x)
      if up.upsampler is not None:
        x = self._run(up.upsampler, x)
      x = constrain(x, IMAGE_AXES)
    return nnx.silu(self.conv_norm_out(x))

  def output_from_features(self, features: jax.Array,
                           kernel: jax.Array | None = None) -> jax.Array:
    """`conv_out` applied to `decode_features`' output, optionally with a substitute kernel.

    Returns float32 pixels.
    """
    if kernel is None:
      return self.conv_out(features).astype(jnp.float32)
    bias = self.conv_out.bias[...]
    dtype = self.conv_out.dtype or features.dtype
    y = jax.lax.conv_general_dilated(
        features.astype(dtype), kernel.astype(dtype), window_strides=(1, 1),
        padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (y + bias.astype(dtype)).astype(jnp.float32)

  def __call__(self, z: jax.Array) -> jax.Array:
    """Decodes NHWC latents to NHWC float32 pixels (nominally in [-1, 1])."""
    return self.output_from_features(self.decode_features(z))

  def decode(self, z: jax.Array) -> jax.Array:
    """Same as calling the module (diffusers-style name)."""
    return self(z)
