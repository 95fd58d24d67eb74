"""Shrunk configs of the stages for tests: a training step compiles and runs in seconds."""
from psvae_jax.config_loader import load_config, set_by_path


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
