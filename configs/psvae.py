"""PS-VAE (stage 2): encoder, E_s, D_s and pixel decoder all trained; semantic target from a
frozen copy of the pretrained encoder; loss 1.0 L_s + 0.1 L_P + kl L_KL (L1 + LPIPS + PatchGAN).

Smoke (CPU, a few minutes; starts from the S-VAE smoke run, PSNR rises):
  python -m psvae_jax.main --config=configs/svae.py:smoke --workdir=/tmp/psvae/svae_smoke
  python -m psvae_jax.main --config=configs/psvae.py:smoke --workdir=/tmp/psvae/psvae_smoke \
      --config.init=/tmp/psvae/svae_smoke

Paper scale (ImageNet-1K, batch 96, lr 1e-4, from the converged S-VAE):
  python -m psvae_jax.main --config=configs/psvae.py --workdir=gs://BUCKET/psvae \
      --config.init=gs://BUCKET/svae --config.model.lpips_weights=/ckpt/lpips
Expected (ImageNet val 256, paper Table): rFID 0.203, PSNR 28.79, LPIPS 0.085, SSIM 0.817.

Presets: '' (paper, DINOv2-B/14-reg), 'siglip2' (SigLIP2-so400m/14, pixel weight 0.05),
'smoke' (tiny random encoder, synthetic shapes, 64 px, CPU), 'toy' (second stage of the toy
text-to-image chain: single-object scenes, 16x16x8 latent, L1 only; see configs/pipeline.py:toy),
'tpu_v5p' / 'tpu_v6e' (the paper run on a TPU slice: bf16 compute, splash attention;
psvae_jax/tpu_presets.py), e.g. on a v5p-128 (64 chips): --config=configs/psvae.py:tpu_v5p
--config.mesh.tensor=4.
"""
import ml_collections

from psvae_jax import tpu_presets
from psvae_jax.config_base import base_config
from psvae_jax.tasks import autoencoder_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  preset, tpu_chip = tpu_presets.split(preset)
  c = base_config("psvae")
  c.model = autoencoder_config.model_config()
  c.loss = autoencoder_config.loss_config()
  # Per-channel latent mean/std over this many training batches, saved with the final
  # checkpoint; the generator stages normalise latents with them.
  c.latent_stats_batches = 200

  c.data.source = "tfds:imagenet2012"
  c.data.image_size = 256
  c.batch_size = 96
  c.total_steps = 200_000
  c.optim.lr = 1e-4
  c.optim.ema_decay = 0.9999
  # The discriminator learns at the same rate; change with e.g. "^discriminator\\.=2.0".
  c.optim.lr_multipliers = ""
  c.log_every = 100
  c.eval_every = 5_000
  c.sample_every = 5_000
  c.checkpoint_every = 5_000
  c.checkpoint.keep_every = 50_000

  if preset == "siglip2":
    c.model.encoder = "siglip2_so400m14"
    c.loss.pixel_weight = 0.05
  elif preset == "smoke":
    autoencoder_config.smoke_overrides(c)
    c.model.require_pretrained_encoder = False
    c.loss.disc_start = 20
    c.latent_stats_batches = 4
    c.total_steps = 40
    c.eval_every = 20
    c.checkpoint_every = 20
    c.sample_every = 0
  elif preset == "toy":
    autoencoder_config.toy_overrides(c)
    c.model.require_pretrained_encoder = False
    c.latent_stats_batches = 16
    # 500 steps reconstruct the single-object world well enough for the T2I scorer (about
    # 32 dB PSNR), and the chain's time goes to the generator.
    c.total_steps = 500
    c.eval_every = 250
    c.checkpoint_every = 250
    c.sample_every = 0
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/psvae.py; known: '', 'siglip2', "
                     "'smoke', 'toy'")
  if tpu_chip:
    tpu_presets.apply(c, tpu_chip)
  return c.lock()
