"""Inception-v3 as pytorch-fid's FID network (`FIDInceptionV3`): pool3 features, NHWC.

The architecture is torchvision's Inception-v3 trunk with pytorch-fid's patches, matching the
TensorFlow graph the reference FID statistics were computed with:
  - Mixed_5b..5d (FIDInceptionA), Mixed_6b..6e (FIDInceptionC) and Mixed_7b (FIDInceptionE_1):
    the pooling branch averages over in-image pixels only (`count_include_pad=False`);
  - Mixed_7c (FIDInceptionE_2): that branch uses a 3x3 max-pool instead.
Every conv is BasicConv2d: conv (no bias) -> BatchNorm (eps 1e-3, inference statistics) -> ReLU.

`FIDInceptionV3()(images)` takes NHWC images in [0, 1] (pytorch-fid's convention) and, like
pytorch-fid's defaults, resizes them bilinearly to 299x299 (torch `F.interpolate(mode='bilinear',
align_corners=False)`, no antialiasing) and maps them to [-1, 1]; it returns (B, 2048) pool3
features. Parameter names follow the torch module names (`Mixed_6b.branch7x7_2.conv.kernel`,
`.bn.{scale,bias,mean,var}`), so `psvae_jax.ports.torch_hub.inception_from_state_dict` maps the
`pt_inception-2015-12-05` weights one to one. All parameters (BatchNorm statistics included) are
nnx.Param: this is a frozen evaluation network.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any

FID_INPUT_SIZE = 299


@functools.lru_cache(maxsize=64)
def bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of torch's bilinear resize (align_corners=False, no antialias)."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
  # Rounding as torch's CPU kernel for float inputs: a float32 scale, the source coordinate
  # computed in double and stored as float32, float32 interpolation weights.
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = max(f32(float(scale) * (i + 0.5) - 0.5), f32(0.0))  # clamped at 0, as torch
    lo = min(int(np.floor(src)), in_size - 1)
    hi = min(lo + 1, in_size - 1)
    frac = min(max(f32(src - f32(lo)), f32(0.0)), f32(1.0))
    weights[i, lo] += f32(1.0) - frac
    weights[i, hi] += frac
  return weights


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Resizes NHWC `x` to `size` = (h, w) as torch bilinear (align_corners=False) does."""
  _, in_h, in_w, _ = x.shape
  x = x.astype(jnp.float32)
  if in_h != size[0]:
    wh = jnp.asarray(bilinear_weights(in_h, size[0]), jnp.float32)
    x = jnp.einsum("oh,bhwc->bowc", wh, x, precision=jax.lax.Precision.HIGHEST)
  if in_w != size[1]:
    ww = jnp.asarray(bilinear_weights(in_w, size[1]), jnp.float32)
    x = jnp.einsum("ow,bhwc->bhoc", ww, x, precision=jax.lax.Precision.HIGHEST)
  return x


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average over in-image pixels only (torch `count_include_pad=False`)."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
  return total / count


class FrozenBatchNorm(nnx.Module):
  """Inference-mode BatchNorm: (x - mean) / sqrt(var + eps) * scale + bias."""

  def __init__(self, channels: int, *, eps: float = 1e-3, param_dtype: Dtype = jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))
    self.mean = nnx.Param(jnp.zeros((channels,), param_dtype))
    self.var = nnx.Param(jnp.ones((channels,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(self.var[...] + self.eps) * self.scale[...]
    return ((x - self.mean[...]) * inv + self.bias[...]).astype(dtype)


class BasicConv2d(nnx.Module):
  """conv (no bias) -> frozen BatchNorm (eps 1e-3) -> ReLU."""

  def __init__(self, in_ch: int, out_ch: int, kernel_size, *, stride: int = 1, padding=0,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.conv = nnx.Conv(in_ch, out_ch, (kh, kw), strides=(stride, stride),
                         padding=((ph, ph), (pw, pw)), use_bias=False, dtype=dtype,
                         param_dtype=param_dtype,
                         kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                           (None, None, None, "conv_out")),
                         rngs=rngs)
    self.bn = FrozenBatchNorm(out_ch, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
  """35x35 block (pytorch-fid FIDInceptionA)."""

  def __init__(self, in_ch: int, pool_features: int, **kw):
    self.branch1x1 = BasicConv2d(in_ch, 64, 1, **kw)
    self.branch5x5_1 = BasicConv2d(in_ch, 48, 1, **kw)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
    self.branch_pool = BasicConv2d(in_ch, pool_features, 1, **kw)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """35x35 -> 17x17 reduction (Mixed_6a)."""

  def __init__(self, in_ch: int, **kw):
    self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **kw)

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
  """17x17 block with factorised 7x7 convs (pytorch-fid FIDInceptionC)."""

  def __init__(self, in_ch: int, channels_7x7: int, **kw):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_ch, 192, 1, **kw)
    self.branch7x7_1 = BasicConv2d(in_ch, c7, 1, **kw)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1, **kw)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
    self.branch_pool = BasicConv2d(in_ch, 192, 1, **kw)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
  """17x17 -> 8x8 reduction (Mixed_7a)."""

  def __init__(self, in_ch: int, **kw):
    self.branch3x3_1 = BasicConv2d(in_ch, 192, 1, **kw)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **kw)
    self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1, **kw)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **kw)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                  self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
  """8x8 block; `max_pool_branch` selects FIDInceptionE_2's max-pool (Mixed_7c)."""

  def __init__(self, in_ch: int, *, max_pool_branch: bool, **kw):
    self.max_pool_branch = max_pool_branch
    self.branch1x1 = BasicConv2d(in_ch, 320, 1, **kw)
    self.branch3x3_1 = BasicConv2d(in_ch, 384, 1, **kw)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch_pool = BasicConv2d(in_ch, 192, 1, **kw)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = max_pool(x, 3, 1, padding=1) if self.max_pool_branch else avg_pool_exclude_pad(x)
    return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
  """pytorch-fid's InceptionV3 up to the final average pool: images -> (B, 2048).

  Args:
    resize_input: bilinearly resize inputs to 299x299 first (pytorch-fid's default). Without it,
      inputs must be at least 75x75.
    normalize_input: inputs are in [0, 1] and are mapped to [-1, 1] (pytorch-fid's default);
      with False they must already be in [-1, 1].
    dtype: conv compute dtype (keep float32 for FID).
  """

  def __init__(self, *, resize_input: bool = True, normalize_input: bool = True,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.resize_input = resize_input
    self.normalize_input = normalize_input
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
    self.Mixed_5b = InceptionA(192, 32, **kw)
    self.Mixed_5c = InceptionA(256, 64, **kw)
    self.Mixed_5d = InceptionA(288, 64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = InceptionC(768, 128, **kw)
    self.Mixed_6c = InceptionC(768, 160, **kw)
    self.Mixed_6d = InceptionC(768, 160, **kw)
    self.Mixed_6e = InceptionC(768, 192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = InceptionE(1280, max_pool_branch=False, **kw)
    self.Mixed_7c = InceptionE(2048, max_pool_branch=True, **kw)

  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FIDInceptionV3 expects NHWC RGB images, got shape {images.shape}")
    x = images.astype(jnp.float32)
    if self.resize_input:
      x = resize_bilinear(x, (FID_INPUT_SIZE, FID_INPUT_SIZE))
    elif min(x.shape[1:3]) < 75:
      raise ValueError(f"Inception-v3 needs inputs of at least 75x75, got {x.shape[1:3]}")
    if self.normalize_input:
      x = 2.0 * x - 1.0
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x, 3, 2)
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
