"""Shrunk configs of the stages for tests: a training step compiles and runs in seconds."""
from psvae_jax.config_loader import load_config, set_by_path


# The S-VAE smoke preset shrunk on the command line, for the tests that launch
# `python -m psvae_jax.main`: a run compiles and trains in well under a minute on CPU.
SVAE_SMOKE_FLAGS = ("--config=configs/svae.py:smoke", "--config.eval_every=0",
                    "--config.logging.tensorboard=False", "--config.model.svae_depth=1",
                    "--config.data.image_size=32", "--config.model.pixel_decoder.ch_mult=(1,1,1,2)",
                    "--config.model.pixel_decoder.resolution=32", "--config.batch_size=8")


def tiny_svae_config(**overrides):
  """The S-VAE smoke preset shrunk further so a step compiles and runs in seconds."""
  config = load_config("configs/svae.py:smoke")
  config.model.encoder_resolution = 56  # 4x4 tokens of the tiny encoder
  config.model.svae_depth = 1
  config.model.latent_channels = 8
  config.model.pixel_decoder.ch_mult = (1, 1, 1, 2)  # 4x4 latents -> 32x32 pixels
  config.model.pixel_decoder.resolution = 32
  config.total_steps = 4
  config.log_every = 2
  config.eval_every = 0
  return _small_run(config, overrides)


def psvae_config_from_svae_run(svae_config, svae_workdir):
  """A 2-step PS-VAE config (discriminator on from step 1) started from the S-VAE run in
  `svae_workdir`; `svae_config` is the conftest fixture building the tiny S-VAE config."""
  config = svae_config()
  config.task = "psvae"
  config.model.discriminator.enabled = True
  config.model.discriminator.ndf = 8
  config.loss.disc_start = 1  # GAN on from the second step
  config.loss.pixel_weight = 0.1
  config.total_steps = 2
  config.optim.ema_decay = 0.0
  with config.unlocked():
    config.latent_stats_batches = 2
  config.init = svae_workdir
  return config


def tiny_psvae_config():
  """The tiny S-VAE test config as a PS-VAE, with the smallest pixel decoder (4x4 -> 4x4 px)."""
  config = tiny_svae_config(**{"optim.ema_decay": 0.5})
  config.task = "psvae"
  config.model.pixel_decoder.ch_mult = (1,)
  config.model.pixel_decoder.num_res_blocks = 0
  config.model.pixel_decoder.attn_resolutions = ()
  config.model.pixel_decoder.resolution = 4
  return config


def t2i_config_for(psvae_config, **overrides):
  """The T2I smoke preset shrunk onto `psvae_config`'s autoencoder (32 text tokens)."""
  return shrink_generator_config(load_config("configs/t2i.py:smoke"), psvae_config.model,
                                 max_text_len=32, **overrides)


def _small_run(config, overrides: dict):
  """The settings every shrunk test config shares (32 px synthetic data, batch 8, checkpoints
  every 2 steps, no TensorBoard, a fixed peak for MFU), then `overrides` ('a.b' -> value)."""
  config.data.image_size = 32
  config.data.synthetic_size = 512
  config.batch_size = 8
  config.eval_batches = 1
  config.checkpoint_every = 2
  config.logging.tensorboard = False
  config.logging.peak_flops_per_device = 1e12
  for key, value in overrides.items():
    set_by_path(config, key, value)
  return config


# config.model.autoencoder keys a generator config takes from its PS-VAE (configs/t2i.py).
GENERATOR_AE_KEYS = ("encoder", "encoder_resolution", "svae_depth", "latent_channels",
                     "scan_layers", "remat", "pixel_decoder")


def shrink_generator_config(config, autoencoder_model, *, max_text_len: int, **overrides):
  """A T2I / edit config shrunk for tests: the autoencoder section from `autoencoder_model`
  (a PS-VAE model section), tiny MMDiT without DDT head, 32 px, 2 steps."""
  for key in GENERATOR_AE_KEYS:
    config.model.autoencoder[key] = autoencoder_model[key]
  config.model.ddt_head = False  # tested in tests/models; keeps compiles short
  config.model.max_text_len = max_text_len
  config.total_steps = 2
  config.log_every = 1
  config.eval_every = 2
  config.flow.eval_times = (0.5,)
  config.flow.sample_steps = 2
  config.flow.num_samples = 2
  return _small_run(config, overrides)


def tiny_generator_config(config, **overrides):
  """Shrinks a T2I / edit config: the tiny S-VAE test autoencoder (4x4x8 latent, 32 px
  decoder), tiny MMDiT without DDT head, short texts, 2 steps."""
  config = shrink_generator_config(config, tiny_svae_config().model, max_text_len=24)
  config.model.autoencoder.pixel_decoder.num_res_blocks = 0
  config.model.autoencoder.pixel_decoder.attn_resolutions = ()
  for key, value in overrides.items():
    set_by_path(config, key, value)
  return config


def tiny_edit_config(**overrides):
  """configs/edit.py:smoke shrunk for tests (random init allowed)."""
  return tiny_generator_config(load_config("configs/edit.py:smoke"),
                               **{"model.require_init": False, **overrides})
