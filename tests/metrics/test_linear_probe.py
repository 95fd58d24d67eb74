"""Linear probe: separable synthetic features -> > 95 %; random labels -> about chance."""
import numpy as np

import psvae_jax  # noqa: F401
from psvae_jax.metrics.linear_probe import linear_probe, probe_features


def _blobs(n, classes, seed, separable=True):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(123).standard_normal((classes, 4, 4, 8)) * 1.0
  labels = rng.integers(0, classes, n)
  feats = rng.standard_normal((n, 4, 4, 8)) * 1.0 + (centres[labels] if separable else 0.0)
  return feats.astype(np.float32), labels


def test_separable_classes_are_recovered():
  xtr, ytr = _blobs(2000, 10, 0)
  xte, yte = _blobs(500, 10, 1)
  result = linear_probe(xtr, ytr, xte, yte, num_classes=10, epochs=20, batch_size=250,
                        learning_rate=1e-2)
  assert result["top1"] > 0.95 and result["top5"] >= result["top1"], result


def test_random_labels_give_chance():
  xtr, _ = _blobs(2000, 10, 0, separable=False)
  xte, _ = _blobs(2000, 10, 1, separable=False)
  rng = np.random.default_rng(5)
  result = linear_probe(xtr, rng.integers(0, 10, 2000), xte, rng.integers(0, 10, 2000),
                        num_classes=10, epochs=50, learning_rate=1e-2)
  assert abs(result["top1"] - 0.1) < 0.04, result
  assert abs(result["top5"] - 0.5) < 0.06, result


def test_pooling():
  f = np.arange(2 * 3 * 3 * 4, dtype=np.float32).reshape(2, 3, 3, 4)
  assert probe_features(f, "flatten").shape == (2, 36)
  np.testing.assert_allclose(probe_features(f, "mean"), f.mean((1, 2)))
