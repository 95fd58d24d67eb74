"""Runs several stages in sequence, each in WORKDIR/<stage name>, each initialised from the
previous stage's workdir. Re-running resumes: a finished stage returns at once (its workdir's
latest checkpoint is already at total_steps), an interrupted one continues from its checkpoint.
"""
from __future__ import annotations

import logging
import os

import ml_collections

from psvae_jax import config_base
from psvae_jax.config_loader import load_config, set_by_path


def stage_configs(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(name, resolved config) of every stage, in order. `stages` entries are
  'name=path/to/config.py[:preset]'; `overrides` entries are 'name.key.path=value' (values
  parsed as Python literals when possible)."""
  import ast

  stages = []
  for entry in config.stages:
    name, sep, spec = entry.partition("=")
    if not sep or not name or not spec:
      raise config_base.ConfigError(
          f"config.stages entry {entry!r}: expected 'name=config.py[:preset]'")
    stages.append((name, load_config(spec)))
  names = [n for n, _ in stages]
  if len(set(names)) != len(names):
    raise config_base.ConfigError(f"config.stages has repeated names: {names}")
  by_name = dict(stages)
  for item in config.overrides:
    key, sep, raw = item.partition("=")
    stage, _, path = key.partition(".")
    if not sep or stage not in by_name or not path:
      raise config_base.ConfigError(
          f"config.overrides entry {item!r}: expected 'stage.key.path=value' with stage in {names}")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    set_by_path(by_name[stage], path, value)
  return stages


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains every stage in order; returns {stage name: that stage's summary}."""
  from psvae_jax import train

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_base.to_json(config))
  summaries = {}
  previous = ""
  for name, stage in stage_configs(config):
    stage_dir = os.path.join(workdir, name)
    if previous and not stage.init:
      stage.init = previous
    logging.info("pipeline stage %s (%s) in %s, init=%r", name, stage.task, stage_dir, stage.init)
    summaries[name] = train.train(stage, stage_dir)
    previous = stage_dir
  return summaries
