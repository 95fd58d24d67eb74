"""LPIPS as an evaluation metric: per-image distances over a dataset, in batches."""
from __future__ import annotations

from typing import Iterable

import jax
import numpy as np
from flax import nnx

from psvae_jax.metrics.precision import full_precision


@nnx.jit
@full_precision
def _lpips_batch(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  return model(x, y)


def lpips_scores(model: nnx.Module, x: np.ndarray | jax.Array, y: np.ndarray | jax.Array, *,
                 batch_size: int = 64) -> np.ndarray:
  """Per-image LPIPS (N,) of two NHWC image arrays in [-1, 1], `batch_size` images at a time.

  `model` is a `psvae_jax.models.lpips.LPIPS` (e.g. from
  `psvae_jax.ports.torch_hub.lpips_from_state_dicts`). The last batch may be smaller (one
  extra compile).
  """
  if x.shape != y.shape:
    raise ValueError(f"lpips_scores: shapes differ: {x.shape} vs {y.shape}")
  out = [np.asarray(_lpips_batch(model, x[i:i + batch_size], y[i:i + batch_size]))
         for i in range(0, x.shape[0], batch_size)]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def mean_lpips(model: nnx.Module, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
  """Mean LPIPS over an iterable of (x, y) NHWC batches in [-1, 1]."""
  total, count = 0.0, 0
  for x, y in pairs:
    scores = np.asarray(_lpips_batch(model, x, y), np.float64)
    total += float(scores.sum())
    count += scores.shape[0]
  if count == 0:
    raise ValueError("mean_lpips: no images")
  return total / count
