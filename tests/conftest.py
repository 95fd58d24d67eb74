"""Test environment: 8 simulated CPU devices, no model hub, deterministic CPU jax.

These variables must be set before jax is imported anywhere, hence at conftest import time.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Tests are compile-bound on CPU: skip LLVM's expensive optimisations (2-4x faster compiles).
os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                            " --xla_llvm_disable_expensive_passes=true")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# One persistent compilation cache per test session: runs that rebuild the same step (resume
# tests, repeated tiny configs) compile it once.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="psvae_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: heavier tests, run with `-m slow`")


def tiny_svae_config(**overrides):
  """The S-VAE smoke preset shrunk further so a step compiles and runs in seconds."""
  from psvae_jax.config_loader import load_config

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
  from psvae_jax.config_loader import set_by_path

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


@pytest.fixture
def svae_config():
  return tiny_svae_config
