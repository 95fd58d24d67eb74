"""The model and losses shared by the two autoencoder stages.

AutoencoderModel holds: the representation `encoder`; the semantic VAE `svae` (E_s, KL, D_s);
the LDM `pixel_decoder` fed the 96-channel latent z; the pixel-loss pieces (`lpips`, a PatchGAN
`discriminator`, LDM's learnable `logvar`); and, for PS-VAE, `teacher`: a frozen copy of the
pretrained encoder that provides the semantic target once the encoder itself is trained.

S-VAE (stage 1): encoder frozen, target = the encoder's own features, the pixel decoder is fed
stop_gradient(z) (it only evaluates the latent). PS-VAE (stage 2): encoder trainable, target =
teacher features, pixel gradients reach the encoder through z.

Generator and discriminator are updated in ONE jitted step: the discriminator loss only sees
stop-gradient images and the generator's GAN term only sees a stop-gradient copy of the
discriminator, so summing both terms gives each parameter group exactly its own gradient.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.config_base import ConfigError
from psvae_jax.losses import perceptual_gan as pg
from psvae_jax.metrics.psnr import psnr
from psvae_jax.metrics.ssim import ssim
from psvae_jax.models.discriminator import NLayerDiscriminator
from psvae_jax.models.lpips import LPIPS
from psvae_jax.models.pixel_decoder import PixelDecoder
from psvae_jax.models.svae import semantic_loss
from psvae_jax.tasks import autoencoder_parts
from psvae_jax.tasks.base import Task


def pixel_decoder_from_config(model_config, *, dtype, attention_impl, rngs) -> PixelDecoder:
  p = model_config.pixel_decoder
  return PixelDecoder(model_config.latent_channels, 3, p.ch, tuple(p.ch_mult), p.num_res_blocks,
                      tuple(p.attn_resolutions), p.resolution, norm_groups=p.norm_groups,
                      remat=model_config.remat, attention_impl=attention_impl, dtype=dtype,
                      rngs=rngs)


class AutoencoderModel(nnx.Module):
  """Encoder (+ frozen teacher), semantic VAE, pixel decoder and pixel-loss networks."""

  def __init__(self, config, *, with_teacher: bool, rngs: nnx.Rngs):
    m, loss = config.model, config.loss
    dtype = autoencoder_parts.compute_dtype(config)
    kw = dict(dtype=dtype, attention_impl=config.attention_impl, rngs=rngs)
    self.encoder = autoencoder_parts.build_representation_encoder(m, **kw)
    self.teacher = autoencoder_parts.build_representation_encoder(m, **kw) if with_teacher else None
    self.svae = autoencoder_parts.build_semantic_vae(m, self.encoder, **kw)
    self.pixel_decoder = pixel_decoder_from_config(m, **kw)
    self.lpips = LPIPS(dtype=dtype, rngs=rngs) if loss.perceptual_weight > 0 else None
    d = m.discriminator
    self.discriminator = (NLayerDiscriminator(3, d.ndf, d.n_layers, dtype=dtype, rngs=rngs)
                          if d.enabled else None)
    self.logvar = pg.LogVariance(loss.logvar_init)


def images_to_unit_range(images: jax.Array) -> jax.Array:
  """uint8 (B, H, W, 3) -> float32 in [-1, 1] (the pixel decoder's range)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def unit_range_to_uint8(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _frozen_view(module: nnx.Module) -> nnx.Module:
  """A copy whose parameters are stop-gradient (batch statistics still update in the copy)."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  # tree.map rebuilds the Variables in the current trace (NNX forbids updating a Variable
  # from another trace level, e.g. inside the adaptive weight's inner grad).
  return nnx.merge(graphdef, jax.lax.stop_gradient(params), jax.tree.map(lambda x: x, rest))


def autoencoder_loss(model: AutoencoderModel, batch, rng, step, config, *, stage: str):
  """Total loss and metrics of one batch for stage 'svae' or 'psvae'."""
  m, lc = config.model, config.loss
  images = batch["image"]
  features = autoencoder_parts.encoder_features(model.encoder, images, m)
  if stage == "psvae":
    target = autoencoder_parts.encoder_features(model.teacher, images, m)
  else:
    features = jax.lax.stop_gradient(features)
    target = features
  recon, z, posterior = model.svae(features, rng)
  l_s, metrics = semantic_loss(recon, jax.lax.stop_gradient(target))
  kl = jnp.mean(posterior.kl())
  z_pixels = z if stage == "psvae" else jax.lax.stop_gradient(z)

  x = images_to_unit_range(images)
  decoder = model.pixel_decoder
  h = decoder.decode_features(z_pixels)
  x_rec = decoder.output_from_features(h)
  if x_rec.shape != x.shape:
    raise ValueError(f"pixel decoder output {x_rec.shape} does not match the images {x.shape}: "
                     "check data.image_size, model.encoder_resolution and the decoder's ch_mult")
  logvar = model.logvar()
  perceptual = model.lpips if model.lpips is not None else None
  # LDM sums the NLL over pixels (per image); 'mean' divides by H*W*C so that the paper's
  # weights (1.0 L_s + 0.1 L_P) balance per-element quantities. The adaptive GAN weight is a
  # gradient-norm ratio, so the GAN term scales along with the NLL.
  scale = 1.0 / float(np.prod(x.shape[1:])) if lc.pixel_reduction == "mean" else 1.0
  nll_of = lambda out: scale * pg.nll_loss(x, out, logvar, perceptual,
                                           perceptual_weight=lc.perceptual_weight).nll
  nll = pg.nll_loss(x, x_rec, logvar, perceptual, perceptual_weight=lc.perceptual_weight)
  pixel = scale * nll.weighted_nll
  d_loss = jnp.zeros((), jnp.float32)
  if model.discriminator is not None:
    disc_factor = pg.adopt_weight(lc.disc_factor, step, lc.disc_start)
    disc_sg = _frozen_view(model.discriminator)
    g_loss = pg.generator_loss(disc_sg(x_rec))
    kernel = decoder.conv_out.kernel[...]
    d_weight = pg.adaptive_disc_weight_at(
        lambda w: nll_of(decoder.output_from_features(h, w)),
        # A fresh view per trace: batch statistics may only be updated in their own trace.
        lambda w: pg.generator_loss(
            _frozen_view(model.discriminator)(decoder.output_from_features(h, w))),
        kernel, disc_weight=lc.disc_weight)
    pixel = pixel + d_weight * disc_factor * g_loss
    logits_real = model.discriminator(jax.lax.stop_gradient(x))
    logits_fake = model.discriminator(jax.lax.stop_gradient(x_rec))
    d_loss = disc_factor * pg.hinge_d_loss(logits_real, logits_fake)
    metrics.update(g_loss=g_loss, d_loss=d_loss, d_weight=d_weight, disc_factor=disc_factor,
                   logits_real=jnp.mean(logits_real), logits_fake=jnp.mean(logits_fake))
  total = lc.semantic_weight * l_s + lc.pixel_weight * pixel + lc.kl_weight * kl + d_loss
  metrics.update(semantic_loss=l_s, kl=kl, pixel_nll=scale * nll.nll, pixel_rec=nll.rec,
                 logvar=logvar, l1=jnp.mean(jnp.abs(x - x_rec)))
  return total, metrics


def reconstruct(model: AutoencoderModel, images: jax.Array, model_config):
  """Posterior-mean reconstruction: (semantic recon, target features, z, pixels in [-1, 1])."""
  features = autoencoder_parts.encoder_features(model.encoder, images, model_config)
  recon, z, _ = model.svae(features)
  return recon, features, z, model.pixel_decoder(z)


def autoencoder_eval(model: AutoencoderModel, batch, config, *, stage: str):
  """Held-out metrics: semantic cosine/MSE (against the teacher in PS-VAE), PSNR, SSIM, LPIPS."""
  images = batch["image"]
  recon, features, z, x_rec = reconstruct(model, images, config.model)
  target = (autoencoder_parts.encoder_features(model.teacher, images, config.model)
            if stage == "psvae" else features)
  _, metrics = semantic_loss(recon, target)
  x = images_to_unit_range(images)
  x_rec = jnp.clip(x_rec, -1.0, 1.0)
  metrics.update(psnr=jnp.mean(psnr(x, x_rec, data_range=2.0)),
                 ssim=jnp.mean(ssim(x, x_rec, data_range=2.0)),
                 latent_mean=jnp.mean(z), latent_std=jnp.std(z))
  if model.lpips is not None:
    metrics["lpips"] = jnp.mean(model.lpips(x, x_rec))
  return metrics


def reconstruction_grid(model: AutoencoderModel, images, model_config,
                        max_images: int = 8) -> dict[str, jax.Array]:
  """Originals and their reconstructions interleaved (original, recon, original, ...).

  Stays a (possibly multi-process) jax array: the training loop gathers it to the host.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, images):
    images = images[:max_images]
    recon = unit_range_to_uint8(reconstruct(nnx.merge(graphdef, state), images, model_config)[3])
    pairs = jnp.stack([images.astype(jnp.uint8), recon], axis=1)
    return pairs.reshape((-1,) + images.shape[1:])

  return {"reconstructions": run(state, images)}


def latent_statistics(model: AutoencoderModel, batches, model_config) -> dict[str, list[float]]:
  """Per-channel mean and std of the posterior mean z over `batches` (uint8 image batches)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def moments(state, images):
    m = nnx.merge(graphdef, state)
    features = autoencoder_parts.encoder_features(m.encoder, images, model_config)
    z = m.svae.encode(features).mean
    z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
    return jnp.sum(z, 0), jnp.sum(jnp.square(z), 0), z.shape[0]

  total = total_sq = None
  count = 0
  for images in batches:
    s, sq, n = jax.device_get(moments(state, images))
    total = s if total is None else total + s
    total_sq = sq if total_sq is None else total_sq + sq
    count += int(n)
  if count == 0:
    raise ValueError("latent statistics need at least one batch")
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
  return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "count": count}


class AutoencoderTask(Task):
  """Shared behaviour of the S-VAE and PS-VAE stages (`stage` set by the subclass)."""

  stage = ""

  def __init__(self, config):
    super().__init__(config)
    self.latent_stats: dict | None = None

  def build_model(self, rngs: nnx.Rngs) -> AutoencoderModel:
    return AutoencoderModel(self.config, with_teacher=self.stage == "psvae", rngs=rngs)

  def loss(self, model, batch, rng, step):
    return autoencoder_loss(model, batch, rng, step, self.config, stage=self.stage)

  def evaluate(self, model, batch, rng):
    return autoencoder_eval(model, batch, self.config, stage=self.stage)

  def sample(self, model, rng, batch, step):
    return reconstruction_grid(model, batch["image"], self.config.model)

  def load_lpips(self, params: nnx.State) -> nnx.State:
    """Pretrained LPIPS weights from config.model.lpips_weights (when LPIPS is used)."""
    if "lpips" not in params:
      return params
    if not self.config.model.lpips_weights:
      if self.config.model.require_pretrained_encoder:
        raise ConfigError(
            "config.model.lpips_weights is empty but LPIPS is part of the loss: pass the "
            "directory holding vgg16.safetensors and lpips_vgg.safetensors (or set "
            "config.loss.perceptual_weight=0)")
      return params
    from psvae_jax.ports.torch_hub import lpips_from_state_dicts
    path = self.config.model.lpips_weights
    module = lpips_from_state_dicts(os.path.join(path, "vgg16.safetensors"),
                                    os.path.join(path, "lpips_vgg.safetensors"))
    return autoencoder_parts.fill_subtree(params, "lpips", nnx.state(module, nnx.Param), what=path)

  def finalize(self, model, training_batches) -> None:
    n = int(self.config.get("latent_stats_batches", 0))
    if n > 0:
      images = (batch["image"] for batch in training_batches(n))
      self.latent_stats = latent_statistics(model, images, self.config.model)

  def checkpoint_extras(self, model) -> dict:
    return {"latent_stats": self.latent_stats} if self.latent_stats else {}

  def restore_extras(self, extras: dict) -> None:
    self.latent_stats = extras.get("latent_stats") or self.latent_stats

  def flops_per_example(self) -> float:
    return autoencoder_parts.autoencoder_train_flops(self.config, self.stage)
