"""Batched LPIPS / FD-DINOv2 helpers with stand-in networks (the networks' own parity is tested
in tests/models)."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

import psvae_jax  # noqa: F401
from psvae_jax.metrics.fd_dinov2 import dinov2_feature_fn, dinov2_inputs
from psvae_jax.metrics.lpips import lpips_scores, mean_lpips


class _FakeLPIPS(nnx.Module):
  def __call__(self, x, y):
    return jnp.mean(jnp.abs(x - y), axis=(1, 2, 3))


class _FakeDINO(nnx.Module):
  def __call__(self, pixel_values):  # (B, H, W, 3) -> "last_hidden_state" (B, 1 + T, D)
    b = pixel_values.shape[0]
    cls = pixel_values.mean((1, 2))[:, None, :]
    return jnp.concatenate([cls, jnp.zeros((b, 4, 3))], axis=1)


def test_lpips_scores_batches():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (7, 8, 8, 3)).astype(np.float32)
  y = rng.uniform(-1, 1, (7, 8, 8, 3)).astype(np.float32)
  scores = lpips_scores(_FakeLPIPS(), x, y, batch_size=3)
  np.testing.assert_allclose(scores, np.abs(x - y).mean((1, 2, 3)), rtol=1e-6)
  np.testing.assert_allclose(mean_lpips(_FakeLPIPS(), [(x[:3], y[:3]), (x[3:], y[3:])]),
                             scores.mean(), rtol=1e-6)


def test_dinov2_inputs_and_features():
  images = np.full((2, 32, 32, 3), 0.5, np.float32)  # [-1, 1] -> 0.75
  pixels = np.asarray(dinov2_inputs(jnp.asarray(images), 28))
  assert pixels.shape == (2, 28, 28, 3)
  np.testing.assert_allclose(pixels[0, 5, 5], (0.75 - np.array([0.485, 0.456, 0.406]))
                             / np.array([0.229, 0.224, 0.225]), rtol=1e-5)
  feats = np.asarray(dinov2_feature_fn(_FakeDINO(), image_size=28)(jnp.asarray(images)))
  np.testing.assert_allclose(feats, pixels.mean((1, 2)), rtol=1e-5)
