"""Loading config files outside absl flag parsing (pipelines, tools, tests)."""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from psvae_jax.config_base import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """`path/to/config.py[:preset]` -> the locked ConfigDict; relative paths are tried against the
  current directory, then the repository root. `overrides` ({'a.b': value}) are applied with
  the same rules as `--config.a.b=value`: unknown keys raise, naming the key."""
  path, _, preset = spec.partition(":")
  candidates = [path, os.path.join(REPO_ROOT, path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise ConfigError(f"config file {path!r} not found (also tried {candidates[1]!r})")
  module_spec = importlib.util.spec_from_file_location(
      f"psvae_config_{os.path.splitext(os.path.basename(found))[0]}", found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(preset) if preset else module.get_config()
  for key, value in (overrides or {}).items():
    set_by_path(config, key, value)
  return config


class ConfigKeyError(ConfigError, KeyError):
  """A config key that does not exist; the message names its full dotted path."""

  def __str__(self) -> str:
    return str(self.args[0])


def set_by_path(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  """config.a.b = value for 'a.b'; a missing key is a ConfigKeyError naming the full path."""
  *parents, leaf = dotted.split(".")
  node = config
  for i, part in enumerate(parents):
    if part not in node:
      raise ConfigKeyError(f"unknown config key {'.'.join(parents[:i + 1])!r} (in {dotted!r})")
    node = node[part]
  if leaf not in node:
    raise ConfigKeyError(f"unknown config key {dotted!r}")
  node[leaf] = value
