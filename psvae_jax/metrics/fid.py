"""Frechet distances between feature distributions (FID on Inception pool3, FD on any features).

  FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The trace term is computed without a general (non-symmetric) matrix square root: for symmetric
PSD S1, S2 the eigenvalues of S1 S2 equal those of the symmetric PSD matrix
S1^(1/2) S2 S1^(1/2), so tr((S1 S2)^(1/2)) = sum sqrt(eigvalsh(S1^(1/2) S2 S1^(1/2))). This is
NumPy float64 (`eigh`), needs no scipy, and stays real and finite for the rank-deficient
covariances of small sample sets, where `scipy.linalg.sqrtm` (pytorch-fid) goes complex and
needs an eps offset. Statistics are accumulated in float64 with `FeatureStats`, so rFID over
50k images streams batch by batch; covariances are unbiased (np.cov's n - 1), as pytorch-fid.
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np


def matrix_sqrt_psd(a: np.ndarray) -> np.ndarray:
  """Symmetric PSD square root of a symmetric matrix (negative eigenvalues clipped to 0)."""
  a = np.asarray(a, np.float64)
  a = 0.5 * (a + a.T)
  eigvals, eigvecs = np.linalg.eigh(a)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((sigma1 @ sigma2)^(1/2)) for symmetric PSD sigma1, sigma2."""
  root1 = matrix_sqrt_psd(sigma1)
  inner = root1 @ np.asarray(sigma2, np.float64) @ root1
  eigvals = np.linalg.eigvalsh(0.5 * (inner + inner.T))
  return float(np.sum(np.sqrt(np.clip(eigvals, 0.0, None))))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"frechet_distance: incompatible shapes mu {mu1.shape}/{mu2.shape}, "
                     f"sigma {sigma1.shape}/{sigma2.shape}")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2))


class FeatureStats:
  """Streaming mean / covariance of feature vectors (float64; Chan et al.'s pairwise update).

  `update(features)` with (N, D) batches (any leading shape is flattened to rows); `merge`
  combines accumulators (e.g. per host); `mean` and `covariance()` give the FID statistics.
  """

  def __init__(self, dim: int | None = None):
    self.dim = dim
    self.count = 0
    self._mean = None if dim is None else np.zeros((dim,), np.float64)
    self._m2 = None if dim is None else np.zeros((dim, dim), np.float64)

  def update(self, features) -> "FeatureStats":
    f = np.asarray(features, np.float64)
    f = f.reshape(-1, f.shape[-1])
    if f.shape[0] == 0:
      return self
    batch = FeatureStats(f.shape[1])
    batch.count = f.shape[0]
    batch._mean = f.mean(axis=0)
    centred = f - batch._mean
    batch._m2 = centred.T @ centred
    return self.merge(batch)

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    if other.count == 0:
      return self
    if self.dim is None:
      self.dim = other.dim
    if other.dim != self.dim:
      raise ValueError(f"FeatureStats: feature dim {other.dim} does not match {self.dim}")
    if self.count == 0:
      self.count, self._mean, self._m2 = other.count, other._mean.copy(), other._m2.copy()
      return self
    n = self.count + other.count
    delta = other._mean - self._mean
    self._m2 = self._m2 + other._m2 + np.outer(delta, delta) * (self.count * other.count / n)
    self._mean = self._mean + delta * (other.count / n)
    self.count = n
    return self

  @property
  def mean(self) -> np.ndarray:
    if self.count == 0:
      raise ValueError("FeatureStats: no features accumulated")
    return self._mean.copy()

  def covariance(self) -> np.ndarray:
    """Unbiased covariance (divides by count - 1, as np.cov)."""
    if self.count < 2:
      raise ValueError(f"FeatureStats: covariance needs at least 2 samples, have {self.count}")
    return self._m2 / (self.count - 1)

  def save_npz(self, path: str) -> None:
    """Writes pytorch-fid's statistics format: `mu`, `sigma` (plus `count`)."""
    np.savez(path, mu=self.mean, sigma=self.covariance(), count=self.count)


def load_stats_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from a pytorch-fid style .npz (e.g. precomputed reference statistics)."""
  with np.load(path) as data:
    missing = {"mu", "sigma"} - set(data.files)
    if missing:
      raise ValueError(f"{path}: missing arrays {sorted(missing)} (has {data.files})")
    return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """Frechet distance between two (N, D) feature sets (statistics as pytorch-fid)."""
  s1, s2 = FeatureStats().update(features1), FeatureStats().update(features2)
  return frechet_distance(s1.mean, s1.covariance(), s2.mean, s2.covariance())


def stats_from_batches(feature_fn: Callable[[jax.Array], jax.Array],
                       batches: Iterable) -> FeatureStats:
  """Accumulates `feature_fn(batch)` (-> (B, D)) over an iterable of image batches."""
  stats = FeatureStats()
  for batch in batches:
    stats.update(np.asarray(feature_fn(batch)))
  return stats


def frechet_distance_between(feature_fn: Callable[[jax.Array], jax.Array], batches_a: Iterable,
                             batches_b: Iterable) -> float:
  """Frechet distance of any feature function's outputs on two streams of image batches
  (e.g. `inception_feature_fn` for rFID, `fd_dinov2.dinov2_feature_fn` for FD-DINOv2)."""
  a = stats_from_batches(feature_fn, batches_a)
  b = stats_from_batches(feature_fn, batches_b)
  return frechet_distance(a.mean, a.covariance(), b.mean, b.covariance())


def inception_feature_fn(model) -> Callable[[jax.Array], jax.Array]:
  """Jitted [-1, 1] NHWC images -> (B, 2048) pool3 features with a `FIDInceptionV3` whose
  `normalize_input` is True (pytorch-fid's [0, 1] input convention)."""
  if not getattr(model, "normalize_input", False):
    raise ValueError("inception_feature_fn expects FIDInceptionV3(normalize_input=True)")
  from flax import nnx

  from psvae_jax.metrics.precision import full_precision

  @nnx.jit
  @full_precision
  def features(m, images):
    return m((images + 1.0) * 0.5)

  return lambda images: features(model, images)
