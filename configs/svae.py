"""S-VAE (PS-VAE stage 1): semantic VAE on frozen DINOv2-B/14 (registers) features, plus the
LDM pixel decoder trained on stop_gradient(z) that evaluates the latent.

Smoke (CPU, ~2 minutes; semantic loss falls, eval semantic cosine rises):
  python -m psvae_jax.main --config=configs/svae.py:smoke --workdir=/tmp/psvae/svae_smoke

Paper scale (ImageNet-1K from TFDS, batch 96, lr 1e-4; convert the encoder once first):
  python -m psvae_jax.tools.convert --src=/models/dinov2-with-registers-base --out=/ckpt/dinov2_b14_reg
  python -m psvae_jax.main --config=configs/svae.py --workdir=gs://BUCKET/svae \
      --config.init=/ckpt/dinov2_b14_reg --config.model.lpips_weights=/ckpt/lpips
Expected: held-out semantic cosine > 0.9; through the evaluation pixel decoder the paper
reports S-VAE rFID 1.41, PSNR 17.8, SSIM 0.39 on ImageNet val.

Presets: '' (paper), 'smoke' (tiny random encoder, synthetic shapes, 64 px, CPU), 'toy' (first
stage of the toy text-to-image chain on single-object scenes, 16x16x8 latent; run it through
configs/pipeline.py:toy).
"""
import ml_collections

from psvae_jax.config_base import base_config
from psvae_jax.tasks import autoencoder_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  c = base_config("svae")
  c.model = autoencoder_config.model_config()
  c.loss = autoencoder_config.loss_config()
  # The pixel decoder only evaluates the latent here (it sees stop_gradient(z)); L1 + LPIPS,
  # no GAN, full weight (its gradients touch nothing else).
  c.model.discriminator.enabled = False
  c.loss.pixel_weight = 1.0
  c.latent_stats_batches = 0  # S-VAE latents are not used by a generator

  c.data.source = "tfds:imagenet2012"
  c.data.image_size = 256
  c.batch_size = 96
  c.total_steps = 100_000
  c.optim.lr = 1e-4
  c.optim.ema_decay = 0.9999
  c.log_every = 100
  c.eval_every = 5_000
  c.sample_every = 5_000
  c.checkpoint_every = 5_000
  c.checkpoint.keep_every = 50_000

  if preset == "smoke":
    autoencoder_config.smoke_overrides(c)
    c.total_steps = 60
    c.eval_every = 30
    c.checkpoint_every = 30
    c.sample_every = 0
  elif preset == "toy":
    autoencoder_config.toy_overrides(c)
    c.total_steps = 200
    c.eval_every = 0
    c.checkpoint_every = 200
    c.sample_every = 0
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/svae.py; known: '', 'smoke', "
                     "'toy'")
  return c.lock()
