"""Shared pieces of every weight port: safe tensor reading and strict assignment.

Only safetensors are read (never pickle). Assignment is strict: every parameter of the target
module must receive a tensor, every source tensor must be used (or explicitly ignored), and
shapes must agree; all problems are collected and reported in one error.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Mapping

import numpy as np
from flax import nnx

from psvae_jax.tree_paths import path_str
from psvae_jax.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


class WeightLoadError(UserError, ValueError):
  """A checkpoint cannot be ported: unreadable, unsafe, or not matching the model."""


def read_json(path: str) -> dict:
  """Reads a JSON file, naming it in the error if it is missing or malformed."""
  if not os.path.isfile(path):
    raise WeightLoadError(f"{path}: file not found")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise WeightLoadError(f"{path}: not valid JSON ({e})") from e


def _refuse_pickle(path: str) -> None:
  raise WeightLoadError(
      f"{path}: pickle-based weight files are refused (unpickling can run arbitrary code). "
      "Convert it once to safetensors, e.g. in Python with torch: "
      "`safetensors.torch.save_file(torch.load(p, weights_only=True), 'model.safetensors')`, "
      "or `model.save_pretrained(dir, safe_serialization=True)`.")


def _read_file(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except (OSError, SafetensorError) as e:
    raise WeightLoadError(f"{path}: cannot read safetensors file ({e})") from e


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads all tensors of a checkpoint: a .safetensors file or a directory (single or sharded).

  Sharded checkpoints are found through their `*.safetensors.index.json`. bf16 tensors are
  returned as float32 numpy arrays.
  """
  if os.path.isfile(path):
    if path.endswith(PICKLE_SUFFIXES):
      _refuse_pickle(path)
    tensors = _read_file(path)
  elif os.path.isdir(path):
    names = os.listdir(path)
    index = next((n for n in INDEX_NAMES if n in names), None)
    single = next((n for n in SINGLE_NAMES if n in names), None)
    if index is not None:
      weight_map = read_json(os.path.join(path, index)).get("weight_map")
      if not isinstance(weight_map, dict):
        raise WeightLoadError(f"{os.path.join(path, index)}: no 'weight_map' object")
      tensors = {}
      for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(path, shard)
        if not os.path.isfile(shard_path):
          raise WeightLoadError(f"{path}: shard {shard} listed in {index} is missing")
        tensors.update(_read_file(shard_path))
      missing = sorted(set(weight_map) - set(tensors))
      if missing:
        raise WeightLoadError(f"{path}: tensors listed in {index} not found in shards: "
                              f"{_preview(missing)}")
    elif single is not None:
      tensors = _read_file(os.path.join(path, single))
    else:
      pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
      if pickles:
        _refuse_pickle(os.path.join(path, pickles[0]))
      raise WeightLoadError(f"{path}: no safetensors weights found (expected one of "
                            f"{SINGLE_NAMES + INDEX_NAMES})")
  else:
    raise WeightLoadError(f"{path}: no such file or directory")
  return {k: _to_numpy_float(v) for k, v in tensors.items()}


def _to_numpy_float(x: np.ndarray) -> np.ndarray:
  if x.dtype.kind == "V" or str(x.dtype) == "bfloat16" or x.dtype == np.float16:
    return x.astype(np.float32)
  return x


def _preview(names: Iterable[str], limit: int = 20) -> str:
  names = list(names)
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


class TensorPool:
  """Source tensors with bookkeeping of which were consumed.

  `take(name)` returns a tensor and marks it used; `leftover()` lists the unused ones, which
  `assign` reports as unexpected.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], *, source: str = "checkpoint"):
    self.tensors = dict(tensors)
    self.source = source
    self.used: set[str] = set()
    self.missing: list[str] = []

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def take(self, name: str) -> np.ndarray | None:
    """The tensor `name`, or None (recorded as missing) if the checkpoint lacks it."""
    if name not in self.tensors:
      self.missing.append(name)
      return None
    self.used.add(name)
    return self.tensors[name]

  def ignore(self, predicate: Callable[[str], bool]) -> None:
    """Marks tensors the port deliberately drops (e.g. unused heads) as consumed."""
    self.used.update(n for n in self.tensors if predicate(n))

  def leftover(self) -> list[str]:
    return sorted(set(self.tensors) - self.used)


def assign(module: nnx.Module, targets: Mapping[str, np.ndarray | None], pool: TensorPool,
           *, what: str) -> None:
  """Writes `targets` (dotted NNX param path -> array) into `module`'s nnx.Param variables.

  Raises one WeightLoadError listing every missing source tensor, every module parameter left
  without a value, every target not in the module, every shape mismatch and every source tensor
  left unused.
  """
  params = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  problems = []
  if pool.missing:
    problems.append(f"missing in {pool.source}: {_preview(sorted(set(pool.missing)))}")
  not_in_module = sorted(set(targets) - set(params))
  if not_in_module:
    problems.append(f"mapped to no parameter of the model: {_preview(not_in_module)}")
  unset = sorted(set(params) - set(targets))
  if unset:
    problems.append(f"model parameters with no source tensor: {_preview(unset)}")
  mis_shaped = []
  for name, array in targets.items():
    if array is None or name not in params:
      continue
    expected = tuple(params[name].get_value().shape)
    if tuple(array.shape) != expected:
      mis_shaped.append(f"{name}: checkpoint {tuple(array.shape)} vs model {expected}")
  if mis_shaped:
    problems.append("mis-shaped: " + "; ".join(mis_shaped))
  leftover = pool.leftover()
  if leftover:
    problems.append(f"unexpected tensors in {pool.source}: {_preview(leftover)}")
  if problems:
    raise WeightLoadError(f"cannot load {what}:\n  " + "\n  ".join(problems))
  for name, array in targets.items():
    variable = params[name]
    dtype = variable.get_value().dtype
    variable.set_value(np.asarray(array, dtype=dtype))
