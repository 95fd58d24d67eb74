"""Bicubic resizing that matches PyTorch's `F.interpolate(mode='bicubic', align_corners=False)`.

`jax.image.resize` uses a different cubic kernel (Keys a=-0.5) and edge handling, so position
embeddings interpolated with it drift from transformers' outputs. Torch has two bicubic paths:
  antialias=False  cubic convolution with a=-0.75, source taps clamped to the border
                   (`upsample_bicubic2d`, the OpenCV convention);
  antialias=True   a separable filter with a=-0.5 stretched by the downscale factor, taps outside
                   the image dropped and weights renormalised (`_upsample_bicubic2d_aa`, the PIL
                   convention).
Both are separable, so a resize is two small matmuls with weight matrices built on the host from
the static shapes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=256)
def bicubic_weights(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
  """(out_size, in_size) matrix W with out = W @ in along one axis, as torch computes it.

  The scale is in_size / out_size (torch's rule when `size=` is given, not `scale_factor=`).
  Source positions and tap weights are computed in float32 like torch's CPU kernels, so the
  rounding of fractional positions (visible for large sizes) follows torch's.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  weights = np.zeros((out_size, in_size), np.float32)
  if not antialias:
    a = f32(-0.75)
    for i in range(out_size):
      src = scale * (f32(i) + f32(0.5)) - f32(0.5)  # no clamp at 0 for cubic (torch cubic=True)
      base = min(int(np.floor(src)), in_size - 1)
      t = min(max(src - f32(base), f32(0)), f32(1))
      taps = _cubic(np.array([t + 1, t, 1 - t, 2 - t], f32), a).astype(f32)
      for offset, w in zip(range(-1, 3), taps):
        weights[i, min(max(base + offset, 0), in_size - 1)] += w
    return weights
  a = f32(-0.5)
  support = f32(2.0) * scale if scale >= 1.0 else f32(2.0)
  inv_scale = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
  for i in range(out_size):
    center = scale * (f32(i) + f32(0.5))
    # int() truncates toward zero, as torch's static_cast does.
    lo = max(int(center - support + f32(0.5)), 0)
    hi = min(int(center + support + f32(0.5)), in_size)
    taps = np.arange(lo, hi).astype(f32)
    w = _cubic((taps - center + f32(0.5)) * inv_scale, a).astype(f32)
    total = w.sum(dtype=f32)
    weights[i, lo:hi] = w / total if total != 0 else w
  return weights


def resize_bicubic(x: jax.Array, size: tuple[int, int], *, antialias: bool = False,
                   axes: tuple[int, int] = (-3, -2)) -> jax.Array:
  """Resizes the two spatial `axes` (default: NHWC / HWC layout) of `x` to `size` = (h, w).

  Matches torch `F.interpolate(..., size=size, mode='bicubic', align_corners=False,
  antialias=antialias)` up to float rounding. Computes in float32 (or x's wider float dtype)
  and returns x's dtype; integer inputs return float32 (no rounding or clipping).
  """
  h_axis, w_axis = (ax % x.ndim for ax in axes)
  out_h, out_w = int(size[0]), int(size[1])
  in_h, in_w = x.shape[h_axis], x.shape[w_axis]
  out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  compute = jnp.promote_types(out_dtype, jnp.float32)
  y = x.astype(compute)
  # Equal sizes give the identity matrix in both modes, so that axis is left untouched.
  if in_h != out_h:
    wh = jnp.asarray(bicubic_weights(in_h, out_h, antialias), compute)
    y = jnp.moveaxis(jnp.tensordot(wh, y, axes=((1,), (h_axis,)),
                                   precision=jax.lax.Precision.HIGHEST), 0, h_axis)
  if in_w != out_w:
    ww = jnp.asarray(bicubic_weights(in_w, out_w, antialias), compute)
    y = jnp.moveaxis(jnp.tensordot(ww, y, axes=((1,), (w_axis,)),
                                   precision=jax.lax.Precision.HIGHEST), 0, w_axis)
  return y.astype(out_dtype)
