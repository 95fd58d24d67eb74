"""LDM LPIPSWithDiscriminator pieces vs direct PyTorch computations of the same formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

import psvae_jax  # noqa: F401
from psvae_jax.losses.perceptual_gan import (LogVariance, adaptive_disc_weight,
                                             adaptive_disc_weight_at, adopt_weight,
                                             generator_loss, hinge_d_loss, nll_loss,
                                             vanilla_d_loss)

RNG = np.random.default_rng(0)
X = RNG.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
FEATURES = RNG.standard_normal((3, 8, 8, 4)).astype(np.float32)  # decoder output before conv_out
KERNEL = (0.3 * RNG.standard_normal((3, 3, 4, 3))).astype(np.float32)  # conv_out (HWIO)
BIAS = (0.1 * RNG.standard_normal(3)).astype(np.float32)
DISC = (0.2 * RNG.standard_normal((3, 3, 3, 1))).astype(np.float32)  # a toy "discriminator"
LOGVAR = 0.3


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _oihw(k):
  return torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))


def _jax_conv(x, k, b=None):
  y = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y if b is None else y + b


def _perceptual_jax(x, y):  # any per-image differentiable stand-in for LPIPS
  return jnp.mean((x - y) ** 2, axis=(1, 2, 3)) * 3.0


def _perceptual_torch(x, y):
  return ((x - y) ** 2).mean(dim=(1, 2, 3), keepdim=True) * 3.0


def test_nll_matches_ldm_formula():
  x_rec = X + 0.2 * RNG.standard_normal(X.shape).astype(np.float32)
  weights = RNG.uniform(0, 2, X.shape).astype(np.float32)
  terms = nll_loss(jnp.asarray(X), jnp.asarray(x_rec), LOGVAR, _perceptual_jax,
                   perceptual_weight=0.7, weights=jnp.asarray(weights))
  xt, rt, lv = _nchw(X), _nchw(x_rec), torch.tensor(LOGVAR)
  rec = torch.abs(xt - rt) + 0.7 * _perceptual_torch(xt, rt)
  nll = rec / torch.exp(lv) + lv
  np.testing.assert_allclose(float(terms.nll), float(nll.sum() / 3), rtol=1e-6)
  np.testing.assert_allclose(float(terms.weighted_nll),
                             float((_nchw(weights) * nll).sum() / 3), rtol=1e-6)
  np.testing.assert_allclose(float(terms.rec), float(rec.mean()), rtol=1e-6)
  # Precomputed per-image values are accepted as well as a function.
  again = nll_loss(jnp.asarray(X), jnp.asarray(x_rec), LOGVAR,
                   _perceptual_jax(jnp.asarray(X), jnp.asarray(x_rec)), perceptual_weight=0.7)
  np.testing.assert_allclose(float(again.nll), float(terms.nll), rtol=1e-6)
  assert float(LogVariance(0.3)()) == np.float32(0.3)


def test_adaptive_weight_matches_torch_autograd():
  disc_weight = 0.5
  feats = jnp.asarray(FEATURES)

  def x_rec_of(w):
    return _jax_conv(feats, w, BIAS)

  nll_of = lambda w: nll_loss(jnp.asarray(X), x_rec_of(w), LOGVAR, _perceptual_jax).nll
  g_of = lambda w: generator_loss(_jax_conv(x_rec_of(w), jnp.asarray(DISC)))
  d_weight = jax.jit(lambda w: adaptive_disc_weight_at(nll_of, g_of, w,
                                                       disc_weight=disc_weight))(KERNEL)

  last = _oihw(KERNEL).requires_grad_(True)
  x_rec = F.conv2d(_nchw(FEATURES), last, torch.from_numpy(BIAS), padding=1)
  xt, lv = _nchw(X), torch.tensor(LOGVAR)
  rec = torch.abs(xt - x_rec) + _perceptual_torch(xt, x_rec)
  nll = (rec / torch.exp(lv) + lv).sum() / 3
  g = -F.conv2d(x_rec, _oihw(DISC), padding=1).mean()
  nll_grads = torch.autograd.grad(nll, last, retain_graph=True)[0]
  g_grads = torch.autograd.grad(g, last, retain_graph=True)[0]
  expected = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4)
  np.testing.assert_allclose(float(d_weight), float(expected) * disc_weight, rtol=1e-5)

  # No gradient flows through the weight: d(d_weight * g)/dw == d_weight * dg/dw.
  total = lambda w: adaptive_disc_weight_at(nll_of, g_of, w) * g_of(w)
  np.testing.assert_allclose(np.asarray(jax.grad(total)(KERNEL)),
                             float(expected) * np.asarray(jax.grad(g_of)(KERNEL)),
                             rtol=1e-4, atol=1e-7)


def test_adaptive_weight_clamps():
  assert float(adaptive_disc_weight(jnp.float32(1e9), jnp.float32(0.0))) == 1e4
  assert float(adaptive_disc_weight(jnp.float32(2.0), jnp.float32(1.0 - 1e-4),
                                    disc_weight=0.5)) == 1.0


def test_hinge_vanilla_generator_values():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.0])
  # real: relu(1 - r) = [0, 0.5, 2] -> 5/6; fake: relu(1 + f) = [0, 1, 2] -> 1
  np.testing.assert_allclose(float(hinge_d_loss(real, fake)), 0.5 * (5 / 6 + 1.0), rtol=1e-6)
  expected = 0.5 * (np.mean(np.log1p(np.exp(-np.asarray(real))))
                    + np.mean(np.log1p(np.exp(np.asarray(fake)))))
  np.testing.assert_allclose(float(vanilla_d_loss(real, fake)), expected, rtol=1e-6)
  assert float(generator_loss(fake)) == np.float32(1 / 3)


def test_adopt_weight_switches_at_disc_start():
  f = jax.jit(lambda step: adopt_weight(1.0, step, threshold=100))
  assert [float(f(s)) for s in (0, 99, 100, 5000)] == [0.0, 0.0, 1.0, 1.0]
  assert float(adopt_weight(0.5, 3, threshold=0)) == 0.5
