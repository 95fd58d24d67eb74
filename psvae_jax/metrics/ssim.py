"""Structural similarity (Wang et al. 2004) with a Gaussian window, per image.

Matches `skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=R, channel_axis=-1)`: an 11-tap Gaussian (sigma 1.5,
truncated at 3.5 sigma as scipy's gaussian_filter, normalised), K1 = 0.01, K2 = 0.03, and the
SSIM map averaged over the pixels at least 5 away from the border (skimage crops the filter
radius; there the filter never reads padding, so a 'valid' filter gives the same map), then
over channels.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=8)
def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
  """scipy.ndimage's 1-D Gaussian: radius int(truncate * sigma + 0.5), weights summing to 1."""
  radius = int(truncate * sigma + 0.5)
  taps = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (taps / sigma) ** 2)
  return w / w.sum()


def _filter_valid(x: jax.Array, window: jax.Array) -> jax.Array:
  """Separable 'valid' filtering of (B, H, W, C) along H and W."""
  taps = window.shape[0]
  h, w = x.shape[1] - taps + 1, x.shape[2] - taps + 1
  x = sum(window[k] * x[:, k:k + h] for k in range(taps))
  return sum(window[k] * x[:, :, k:k + w] for k in range(taps))


def ssim(x: jax.Array, y: jax.Array, *, data_range: float, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Mean SSIM per image -> (B,). x, y: (B, H, W, C) or (B, H, W); H, W >= the window (11).

  `data_range` is the span of the value range (2.0 for [-1, 1], 1.0 for [0, 1], 255.0 for
  uint8 values). Computed in float32 on images divided by `data_range` (SSIM is invariant to
  that joint rescaling), which keeps the variance terms well conditioned.
  """
  if x.shape != y.shape:
    raise ValueError(f"ssim: shapes differ: {x.shape} vs {y.shape}")
  if x.ndim == 3:
    x, y = x[..., None], y[..., None]
  if x.ndim != 4:
    raise ValueError(f"ssim expects (B, H, W[, C]) images, got shape {x.shape}")
  window = jnp.asarray(gaussian_window(float(sigma)), jnp.float32)
  if min(x.shape[1:3]) < window.shape[0]:
    raise ValueError(f"ssim: images {x.shape[1:3]} are smaller than the {window.shape[0]}-tap "
                     "window")
  x = x.astype(jnp.float32) / data_range
  y = y.astype(jnp.float32) / data_range
  ux, uy = _filter_valid(x, window), _filter_valid(y, window)
  vx = _filter_valid(x * x, window) - ux * ux
  vy = _filter_valid(y * y, window) - uy * uy
  vxy = _filter_valid(x * y, window) - ux * uy
  c1, c2 = k1 ** 2, k2 ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))
