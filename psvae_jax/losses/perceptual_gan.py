"""LDM's `LPIPSWithDiscriminator` pixel loss, as pure functions (plus the learnable log-variance).

The generator-side objective of LDM's autoencoder training, step by step:
  rec = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)       per pixel (LPIPS broadcast)
  nll = rec / exp(logvar) + logvar                              per pixel
  nll_loss = sum(nll) / batch                                   summed per image, batch-averaged
  g_loss = -mean(D(x_rec))
  d_weight = clip(||dnll/dW|| / (||dg/dW|| + 1e-4), 0, 1e4) * disc_weight   (stop-gradient)
      W = the decoder's last layer (conv_out) kernel
  loss = weighted_nll_loss + kl_weight * kl + d_weight * adopt_weight(disc_factor, step,
         disc_start) * g_loss
and the discriminator's: adopt_weight(disc_factor, step, disc_start) * hinge(D(x), D(x_rec)).
Note the scale this implies: the LPIPS value (one per image) enters once per pixel and channel,
and logvar once per pixel and channel (as in LDM). The KL term is the caller's.

Typical use inside a jitted train step (`decoder` a `PixelDecoder`):
  h = decoder.decode_features(z)
  kernel = decoder.conv_out.kernel[...]
  def nll_of(w): return nll_loss(x, decoder.output_from_features(h, w), logvar, lpips_fn).nll
  def g_of(w): return generator_loss(disc(decoder.output_from_features(h, w)))
  d_weight = adaptive_disc_weight_at(nll_of, g_of, kernel, disc_weight=0.5)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class LogVariance(nnx.Module):
  """LDM's learnable scalar output log-variance (`logvar`, initialised to `init`)."""

  def __init__(self, init: float = 0.0):
    self.value = nnx.Param(jnp.asarray(init, jnp.float32))

  def __call__(self) -> jax.Array:
    return self.value[...]


class NllTerms(NamedTuple):
  nll: jax.Array           # sum(nll) / batch (used for the adaptive weight)
  weighted_nll: jax.Array  # the same with per-element `weights` (equals nll without weights)
  rec: jax.Array           # mean of rec = |x - x_rec| + perceptual_weight * lpips (for logging)


def nll_loss(inputs: jax.Array, reconstructions: jax.Array, logvar: jax.Array,
             perceptual: jax.Array | Callable[[jax.Array, jax.Array], jax.Array] | None = None,
             *, perceptual_weight: float = 1.0, weights: jax.Array | None = None) -> NllTerms:
  """LDM's reconstruction negative log-likelihood.

  Args:
    inputs, reconstructions: (B, H, W, C) images (LDM: in [-1, 1]).
    logvar: scalar log-variance (a `LogVariance()` value).
    perceptual: per-image LPIPS values (B,), or a function (x, x_rec) -> (B,) such as an
      `LPIPS` module; None (or perceptual_weight 0) for pure L1.
    perceptual_weight: LDM's `perceptual_weight` (1.0).
    weights: optional per-element weights broadcastable to the images (LDM's `weights`).
  """
  x = inputs.astype(jnp.float32)
  x_rec = reconstructions.astype(jnp.float32)
  rec = jnp.abs(x - x_rec)
  if perceptual is not None and perceptual_weight > 0:
    p = perceptual(x, x_rec) if callable(perceptual) else perceptual
    p = jnp.asarray(p, jnp.float32).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    rec = rec + perceptual_weight * p
  logvar = jnp.asarray(logvar, jnp.float32)
  nll = rec / jnp.exp(logvar) + logvar
  batch = x.shape[0]
  total = jnp.sum(nll) / batch
  weighted = total if weights is None else jnp.sum(weights * nll) / batch
  return NllTerms(nll=total, weighted_nll=weighted, rec=jnp.mean(rec))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """-mean(D(x_rec)) (LDM's g_loss, used with both hinge and vanilla discriminator losses)."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))."""
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_rec))))."""
  real = jnp.mean(jax.nn.softplus(-logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.softplus(logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def adopt_weight(weight: float | jax.Array, step: int | jax.Array, threshold: int,
                 value: float = 0.0) -> jax.Array:
  """`value` before step `threshold` (LDM's disc_start), `weight` from then on; traceable."""
  return jnp.where(jnp.asarray(step) < threshold, jnp.asarray(value, jnp.float32),
                   jnp.asarray(weight, jnp.float32))


def adaptive_disc_weight(nll_grad_norm: jax.Array, g_grad_norm: jax.Array, *,
                         disc_weight: float = 1.0, max_weight: float = 1e4) -> jax.Array:
  """stop_gradient(clip(nll_grad_norm / (g_grad_norm + 1e-4), 0, max_weight)) * disc_weight."""
  ratio = nll_grad_norm / (g_grad_norm + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight)) * disc_weight


def grad_norm_at(loss_of_weight: Callable[[jax.Array], jax.Array], weight: jax.Array) -> jax.Array:
  """Frobenius norm of d loss / d weight (layout-independent, so equal to torch's)."""
  grad = jax.grad(lambda w: jnp.asarray(loss_of_weight(w), jnp.float32))(weight)
  return jnp.sqrt(jnp.sum(jnp.square(grad.astype(jnp.float32))))


def adaptive_disc_weight_at(nll_of_weight: Callable[[jax.Array], jax.Array],
                            g_of_weight: Callable[[jax.Array], jax.Array], weight: jax.Array, *,
                            disc_weight: float = 1.0, max_weight: float = 1e4) -> jax.Array:
  """LDM's `calculate_adaptive_weight`: both losses' gradient norms at the last-layer `weight`.

  `nll_of_weight(w)` / `g_of_weight(w)` must recompute the two losses with the decoder's last
  layer kernel replaced by `w` (see `PixelDecoder.output_from_features`).
  """
  return adaptive_disc_weight(grad_norm_at(nll_of_weight, weight),
                              grad_norm_at(g_of_weight, weight), disc_weight=disc_weight,
                              max_weight=max_weight)
