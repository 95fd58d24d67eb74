"""PSNR (closed form) and SSIM vs skimage.metrics.structural_similarity (Gaussian, sigma 1.5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psvae_jax  # noqa: F401
from psvae_jax.metrics.psnr import psnr, to_uint8_values
from psvae_jax.metrics.ssim import gaussian_window, ssim

skimage_metrics = pytest.importorskip("skimage.metrics")


def _pair(shape, noise, seed, low=-1.0, high=1.0):
  rng = np.random.default_rng(seed)
  # Smooth-ish content plus noise so SSIM is neither ~0 nor ~1.
  base = rng.uniform(low, high, shape)
  base = 0.5 * (base + np.roll(base, 1, axis=1))
  other = np.clip(base + noise * (high - low) * rng.standard_normal(shape), low, high)
  return base, other


def test_psnr_closed_form():
  x, y = _pair((3, 16, 16, 3), 0.05, 0)
  mse = ((x - y) ** 2).reshape(3, -1).mean(1)
  np.testing.assert_allclose(np.asarray(psnr(jnp.asarray(x), jnp.asarray(y))),
                             10 * np.log10(4.0 / mse), rtol=1e-5)
  assert np.isinf(float(psnr(jnp.asarray(x), jnp.asarray(x))[0]))
  u8 = np.asarray(to_uint8_values(jnp.asarray([-1.0, 0.0, 1.0, 2.0])))
  np.testing.assert_array_equal(u8, [0.0, 128.0, 255.0, 255.0])


def test_gaussian_window_is_scipy_kernel():
  from scipy.ndimage import gaussian_filter1d
  impulse = np.zeros(41)
  impulse[20] = 1.0
  ref = gaussian_filter1d(impulse, 1.5, truncate=3.5)[15:26]
  np.testing.assert_allclose(gaussian_window(1.5), ref, atol=1e-15)
  assert gaussian_window(1.5).shape == (11,)


@pytest.mark.parametrize("shape,low,high,data_range,noise", [
    ((2, 32, 40, 3), -1.0, 1.0, 2.0, 0.1),
    ((2, 24, 24, 3), 0.0, 255.0, 255.0, 0.03),
    ((1, 17, 29), 0.0, 1.0, 1.0, 0.3),
])
def test_ssim_matches_skimage(shape, low, high, data_range, noise):
  x, y = _pair(shape, noise, 1, low, high)
  if data_range == 255.0:
    x, y = np.round(x), np.round(y)
  ours = np.asarray(jax.jit(lambda a, b: ssim(a, b, data_range=data_range))(
      jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
  channel_axis = -1 if len(shape) == 4 else None
  ref = [skimage_metrics.structural_similarity(
      x[i], y[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
      data_range=data_range, channel_axis=channel_axis) for i in range(shape[0])]
  assert ours.shape == (shape[0],)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  assert 0.05 < min(ref) and max(ref) < 0.99  # a non-trivial regime
  np.testing.assert_allclose(np.asarray(ssim(jnp.asarray(x), jnp.asarray(x),
                                             data_range=data_range)), 1.0, atol=1e-6)
