"""Optimizer construction: AdamW + schedule + clipping, per-group learning rates, frozen masks.

Frozen parameters are removed from the optimised state altogether (see `train_state`), so the
optimizer here only ever sees trainable parameters.
"""
from __future__ import annotations

import re

import jax
import ml_collections
import optax

from psvae_jax.config_base import ConfigError
from psvae_jax.tree_paths import path_str


def compile_regex(pattern: str, key: str) -> re.Pattern | None:
  """Compiles a config regex, naming the config key on a syntax error."""
  if not pattern:
    return None
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"config.{key}={pattern!r} is not a valid regex: {e}") from e


def parse_lr_multipliers(spec: str) -> list[tuple[re.Pattern, float]]:
  """'regex=mult,regex=mult' -> [(compiled, mult)], first match wins."""
  rules = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    pattern, sep, mult = item.rpartition("=")
    if not sep:
      raise ConfigError(f"config.optim.lr_multipliers item {item!r}: expected 'regex=multiplier'")
    try:
      value = float(mult)
    except ValueError as e:
      raise ConfigError(f"config.optim.lr_multipliers item {item!r}: {mult!r} is not a number") from e
    rules.append((compile_regex(pattern, "optim.lr_multipliers"), value))
  return rules


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up then constant or cosine decay to zero."""
  warmup = int(optim.warmup_steps)
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, max(warmup, 1) if warmup else 0,
                                              max(total_steps, warmup + 1), end_value=0.0)
  if warmup:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr)], [warmup])
  return optax.constant_schedule(optim.lr)


def _adamw(optim, schedule) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=optim.weight_decay)


def build_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                    params) -> optax.GradientTransformation:
  """Gradient clipping (global norm over trainable params) then AdamW per lr group."""
  schedule = learning_rate_schedule(optim, total_steps)
  rules = parse_lr_multipliers(optim.lr_multipliers)
  if rules:
    def label(path, _):
      name = path_str(path)
      for i, (pattern, _) in enumerate(rules):
        if pattern.search(name):
          return f"group{i}"
      return "default"

    labels = jax.tree_util.tree_map_with_path(label, params)
    transforms = {"default": _adamw(optim, schedule)}
    for i, (_, mult) in enumerate(rules):
      transforms[f"group{i}"] = _adamw(optim, lambda step, m=mult: m * schedule(step))
    tx = optax.multi_transform(transforms, labels)
  else:
    tx = _adamw(optim, schedule)
  if optim.grad_clip and optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  return tx


def ema_update(ema, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params (leaf-wise, in float32)."""
  return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)
