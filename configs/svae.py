"""S-VAE (PS-VAE stage 1): semantic VAE on frozen DINOv2-B/14 (registers) features.

Smoke (CPU, ~2 minutes; semantic loss falls, eval cosine rises):
  python -m psvae_jax.main --config=configs/svae.py:smoke --workdir=/tmp/svae_smoke

Paper scale (ImageNet-1K from TFDS, batch 96, lr 1e-4; convert the encoder once first):
  python -m psvae_jax.tools.convert --src=/path/to/dinov2-with-registers-base --out=/ckpt/dinov2_b14_reg
  python -m psvae_jax.main --config=configs/svae.py --workdir=gs://bucket/svae \
      --config.init=/ckpt/dinov2_b14_reg
Expected: semantic cosine of the posterior mean on held-out images > 0.9 after ~100k steps
(the paper reports S-VAE rFID 1.41 / PSNR 17.8 through its evaluation pixel decoder).

Presets: '' (paper), 'smoke' (tiny random encoder, synthetic shapes, 64 px, CPU).
"""
import ml_collections

from psvae_jax.config_base import base_config


def model_config() -> ml_collections.ConfigDict:
  """Keys shared by the S-VAE and PS-VAE stages."""
  m = ml_collections.ConfigDict()
  m.encoder = "dinov2_b14_reg"  # preset name of the representation encoder (models.encoders)
  m.encoder_resolution = 224  # pixels fed to the encoder (bicubic resize + mean/std)
  m.svae_depth = 3  # transformer blocks in E_s and in D_s
  m.latent_channels = 96
  m.init_from_encoder = False  # copy the encoder's last svae_depth blocks into E_s/D_s
  m.scan_layers = False
  m.remat = False
  m.require_pretrained_encoder = True  # scratch start without config.init is an error
  return m


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  c = base_config("svae")
  c.model = model_config()
  c.loss = ml_collections.ConfigDict()
  c.loss.semantic_weight = 1.0
  c.loss.kl_weight = 1e-6  # LDM kl-f16 convention (KL summed over latent dims)

  c.data.source = "tfds:imagenet2012"
  c.data.image_size = 256
  c.batch_size = 96
  c.total_steps = 100_000
  c.optim.lr = 1e-4
  c.optim.ema_decay = 0.9999
  c.log_every = 100
  c.eval_every = 5_000
  c.checkpoint_every = 5_000
  c.checkpoint.keep_every = 50_000

  if preset == "smoke":
    c.model.encoder = "tiny"
    c.model.encoder_resolution = 112
    c.model.require_pretrained_encoder = False
    c.data.source = "synthetic:shapes"
    c.data.image_size = 64
    c.batch_size = 16
    c.total_steps = 60
    c.optim.lr = 1e-3
    c.optim.ema_decay = 0.99
    c.log_every = 10
    c.eval_every = 30
    c.eval_batches = 2
    c.checkpoint_every = 30
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/svae.py; known: '', 'smoke'")
  return c.lock()
