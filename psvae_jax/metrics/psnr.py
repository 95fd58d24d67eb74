"""Peak signal-to-noise ratio, per image."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def psnr(x: jax.Array, y: jax.Array, *, data_range: float = 2.0) -> jax.Array:
  """10 * log10(data_range**2 / MSE) per image over all non-batch axes -> (B,).

  `data_range` is the span of the value range: 2.0 for images in [-1, 1] (the default), 1.0
  for [0, 1], 255.0 for uint8 pixel values. Identical images give +inf. Reconstruction tables
  (e.g. the paper's) are usually computed on uint8-quantised images: see `to_uint8_values`.
  """
  if x.shape != y.shape:
    raise ValueError(f"psnr: shapes differ: {x.shape} vs {y.shape}")
  diff = x.astype(jnp.float32) - y.astype(jnp.float32)
  mse = jnp.mean(jnp.square(diff), axis=tuple(range(1, x.ndim)))
  return 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse)


def to_uint8_values(images: jax.Array) -> jax.Array:
  """[-1, 1] images -> float32 values on the uint8 grid {0, ..., 255} (clip, scale, round)."""
  return jnp.round(jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0))
