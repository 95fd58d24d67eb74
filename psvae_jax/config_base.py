"""The keys every stage shares, and the checks applied to a resolved config.

Stage configs in configs/ call `base_config(task=...)`, fill in their task-specific `model` and
`loss` sections, and return the result locked: `--config.x.y=v` overrides then work for every
existing key and an unknown key is an error naming it.
"""
from __future__ import annotations

import json
from typing import Any

import ml_collections

from psvae_jax.data.config import default_data_config
from psvae_jax.errors import UserError
from psvae_jax.storage_retry import RetryPolicy


class ConfigError(UserError, ValueError):
  """A config value is missing, of the wrong type or inconsistent."""


def base_config(task: str) -> ml_collections.ConfigDict:
  """Shared keys (docs/method.md#stable-interfaces) with their defaults."""
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 96  # global, across all processes
  c.log_every = 50
  c.checkpoint_every = 1000
  c.eval_every = 1000
  c.sample_every = 0  # 0 = only at the end (tasks without sampling ignore it)
  c.eval_batches = 4
  c.data = default_data_config()
  # dcn_data: slices the data axis spans (multi-slice TPU jobs; 1 = one slice).
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1})
  # Pretrained weights this stage starts from (a converted-weights dir or a previous stage's
  # workdir/checkpoint); only used when there is nothing to resume.
  c.init = ""
  # Another run's workdir (or checkpoints dir) to continue exactly (state, EMA, data position).
  c.resume = ""
  c.compute_dtype = "float32"  # or "bfloat16": params and optimizer state stay float32
  c.attention_impl = "xla"  # 'xla' | 'cudnn' | 'splash'
  c.nonfinite = "raise"  # 'raise' | 'skip': what a non-finite loss or gradient norm does

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"  # 'constant' | 'cosine'
  c.optim.grad_clip = 1.0  # global-norm clip; 0 disables
  # Parameters whose dotted path matches this regex (re.search) are frozen: no gradients, no
  # optimizer state, no EMA. Tasks add their own (e.g. the S-VAE's encoder); '' = none extra.
  c.optim.frozen = ""
  # Per-group learning-rate multipliers: "regex=mult,regex=mult" (first match wins).
  c.optim.lr_multipliers = ""
  c.optim.ema_decay = 0.0  # 0 disables EMA

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 3  # newest N kept
  c.checkpoint.keep_every = 0  # also keep every K-th step forever (0 = none)
  c.checkpoint.async_save = True
  # SHA-256 manifest per finalized step (one extra read of the checkpoint after each save);
  # steps with one are checked before every restore, and an altered file counts as damage.
  c.checkpoint.checksums = True
  # When this workdir holds checkpoints but none is complete (all damaged): False stops with an
  # error listing each step's problem; True sets them aside and starts fresh (config.resume,
  # config.init or scratch). Damaged steps newer than a complete one are always skipped.
  c.checkpoint.allow_fresh_start = False
  # A save that fails (disk full, I/O error, permission lost; the error names the path and the
  # free space): 'stop' ends the run with the error; 'retry' logs it as a warning, training goes
  # on and the next save tries again. The last save of a run and the SIGTERM save stop the run
  # on failure either way. The newest complete step is never removed before a newer one exists.
  c.checkpoint.on_save_error = "stop"

  # Reads of data shards, images, captions, latent caches and checkpoints retry transient
  # storage errors (I/O error, timeout, connection reset, UNAVAILABLE...; see storage_retry.py):
  # up to `retries` more attempts, waiting initial_backoff_s, doubled each time, at most
  # max_backoff_s; each retry is logged as a warning with the path. Permanent errors (missing
  # file, not an image) are not retried.
  c.io = ml_collections.ConfigDict()
  c.io.retries = RetryPolicy.retries
  c.io.initial_backoff_s = RetryPolicy.initial_backoff_s
  c.io.max_backoff_s = RetryPolicy.max_backoff_s

  c.logging = ml_collections.ConfigDict()
  # Peak FLOP/s of one device for MFU; 0 = look up a table by device kind (CPU: measured).
  c.logging.peak_flops_per_device = 0.0
  c.logging.tensorboard = True
  return c


_CHOICES = {
    "compute_dtype": ("float32", "bfloat16"),
    "attention_impl": ("xla", "cudnn", "splash"),
    "nonfinite": ("raise", "skip"),
    "optim.schedule": ("constant", "cosine"),
    "checkpoint.on_save_error": ("stop", "retry"),
}


def _get(config, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


# Attention implementations that cannot run on a platform: (impl, platform) -> why.
_ATTENTION_PLATFORMS = {
    ("splash", "cpu"): "the splash kernel is a TPU Pallas kernel; use 'xla'",
    ("splash", "gpu"): "the splash kernel is a TPU Pallas kernel; use 'cudnn' or 'xla'",
    ("splash", "cuda"): "the splash kernel is a TPU Pallas kernel; use 'cudnn' or 'xla'",
    ("cudnn", "tpu"): "cuDNN is the GPU kernel; use 'splash' or 'xla'",
}


def validate(config: ml_collections.ConfigDict, platform: str | None = None) -> None:
  """Checks values that a type system cannot; raises ConfigError naming the key.

  platform: the platform the step is compiled for ('cpu', 'gpu', 'tpu'; the devices' platform),
  which rules out attention implementations that cannot run there.
  """
  for key, choices in _CHOICES.items():
    value = _get(config, key)
    if value not in choices:
      raise ConfigError(f"config.{key}={value!r}: expected one of {choices}")
  for key in ("total_steps", "batch_size", "log_every"):
    if _get(config, key) <= 0:
      raise ConfigError(f"config.{key}={_get(config, key)} must be positive")
  for key in ("checkpoint_every", "eval_every", "sample_every"):
    if _get(config, key) < 0:
      raise ConfigError(f"config.{key}={_get(config, key)} must be >= 0 (0 disables)")
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ConfigError(f"config.optim.ema_decay={config.optim.ema_decay} must be in [0, 1)")
  _validate_io(config.io)
  why = _ATTENTION_PLATFORMS.get((config.attention_impl, platform))
  if why:
    raise ConfigError(f"config.attention_impl={config.attention_impl!r} cannot run on platform "
                      f"{platform!r}: {why}")


def _validate_io(io) -> None:
  if io.retries < 0:
    raise ConfigError(f"config.io.retries={io.retries} must be >= 0 (0 = no retry)")
  if io.initial_backoff_s < 0:
    raise ConfigError(f"config.io.initial_backoff_s={io.initial_backoff_s} must be >= 0")
  if io.max_backoff_s < io.initial_backoff_s:
    raise ConfigError(f"config.io.max_backoff_s={io.max_backoff_s} must be >= "
                      f"config.io.initial_backoff_s={io.initial_backoff_s}")


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (what is written to WORKDIR/config.json)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
