"""Frechet distance maths vs NumPy/SciPy (pytorch-fid's formula with scipy.linalg.sqrtm)."""
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx

import psvae_jax  # noqa: F401
from psvae_jax.metrics.fid import (FeatureStats, fid_from_features, frechet_distance,
                                   frechet_distance_between, inception_feature_fn,
                                   load_stats_npz, matrix_sqrt_psd, trace_sqrt_product)


def _cov(dim, seed, samples=None):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((dim, samples or 3 * dim))
  return a @ a.T / a.shape[1]


def _reference_fd(mu1, s1, mu2, s2):
  """pytorch-fid's calculate_frechet_distance (without its singular-matrix eps fallback)."""
  covmean = scipy.linalg.sqrtm(s1.dot(s2))
  covmean = covmean.real
  diff = mu1 - mu2
  return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_matrix_sqrt_matches_scipy():
  s = _cov(40, 0)
  root = matrix_sqrt_psd(s)
  np.testing.assert_allclose(root, scipy.linalg.sqrtm(s).real, atol=1e-10)
  np.testing.assert_allclose(root @ root, s, atol=1e-10)


def test_trace_and_distance_match_scipy():
  rng = np.random.default_rng(1)
  s1, s2 = _cov(64, 1), _cov(64, 2) * 1.7
  mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
  np.testing.assert_allclose(trace_sqrt_product(s1, s2),
                             np.trace(scipy.linalg.sqrtm(s1 @ s2)).real, rtol=1e-10)
  ours = frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(ours, _reference_fd(mu1, s1, mu2, s2), rtol=1e-9)
  assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_rank_deficient_covariances_stay_finite():
  # 10 samples in 32 dims: rank-deficient; the trace term is still well defined.
  f1 = np.random.default_rng(3).standard_normal((10, 32))
  f2 = np.random.default_rng(4).standard_normal((10, 32)) + 0.5
  fd = fid_from_features(f1, f2)
  assert np.isfinite(fd) and fd > 0
  s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  eps = np.eye(32) * 1e-6  # pytorch-fid's fallback for singular products
  ref = _reference_fd(f1.mean(0), s1 + eps, f2.mean(0), s2 + eps)
  np.testing.assert_allclose(fd, ref, rtol=1e-3)


def test_streaming_stats_match_numpy(tmp_path):
  feats = np.random.default_rng(5).standard_normal((257, 16)) * 3 + 1
  stats = FeatureStats()
  for lo, hi in ((0, 1), (1, 100), (100, 100), (100, 257)):
    stats.update(feats[lo:hi])
  np.testing.assert_allclose(stats.mean, feats.mean(0), atol=1e-12)
  np.testing.assert_allclose(stats.covariance(), np.cov(feats, rowvar=False), atol=1e-12)
  merged = FeatureStats(16).update(feats[:50]).merge(FeatureStats().update(feats[50:]))
  np.testing.assert_allclose(merged.covariance(), stats.covariance(), atol=1e-12)
  stats.save_npz(str(tmp_path / "ref.npz"))
  mu, sigma = load_stats_npz(str(tmp_path / "ref.npz"))
  np.testing.assert_allclose(sigma, stats.covariance())
  with pytest.raises(ValueError, match="at least 2"):
    FeatureStats().update(feats[:1]).covariance()


class _FakeInception(nnx.Module):
  normalize_input = True

  def __call__(self, images):  # [0, 1] in -> "features"
    return jnp.concatenate([images.mean((1, 2)), images.min((1, 2))], axis=-1)


def test_feature_function_helpers():
  rng = np.random.default_rng(6)
  a = [rng.uniform(-1, 1, (8, 4, 4, 3)).astype(np.float32) for _ in range(3)]
  b = [rng.uniform(-1, 0.8, (8, 4, 4, 3)).astype(np.float32) for _ in range(3)]
  fn = inception_feature_fn(_FakeInception())
  np.testing.assert_allclose(np.asarray(fn(a[0]))[:, :3], ((a[0] + 1) / 2).mean((1, 2)),
                             atol=1e-6)
  fd = frechet_distance_between(fn, a, b)
  fa = np.concatenate([np.asarray(fn(x)) for x in a])
  fb = np.concatenate([np.asarray(fn(x)) for x in b])
  np.testing.assert_allclose(fd, fid_from_features(fa, fb), rtol=1e-9)
