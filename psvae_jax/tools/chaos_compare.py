"""Bit-for-bit comparison of two runs' checkpoints at one step: every array of the train state
(parameters, optimizer state, the rest) and of the EMA, and the stored data-iterator position.

The arrays are read without a model (targets built from the stored metadata, on one CPU
device) and compared as bytes with their dtype and shape; the data position is compared as
the bytes of the files the data item holds (Orbax's commit marker aside).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from psvae_jax.tree_paths import flatten_dotted

ARRAY_ITEMS = ("state", "ema")
DATA_ITEM = "data"
# Orbax's marker in each item directory; its text names the directory it was written to.
COMMIT_MARKER = "commit_success.txt"
CATEGORIES = ("params", "EMA", "optimizer state", "data position", "other state")


def read_step(checkpoints: str, step: int) -> dict[str, np.ndarray | bytes]:
  """{'state/<path>' | 'ema/<path>': array, 'data/<file>': bytes} of one checkpoint step."""
  import jax
  import orbax.checkpoint as ocp

  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # reading only: no accelerator needed
  device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  step_dir = os.path.join(checkpoints, str(step))
  out: dict[str, np.ndarray | bytes] = {}
  for item in ARRAY_ITEMS:
    path = os.path.join(step_dir, item)
    if not os.path.isdir(path):
      continue
    reader = ocp.StandardCheckpointer()
    stored = reader.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          stored)
    for name, leaf in flatten_dotted(reader.restore(path, target)).items():
      out[f"{item}/{name}"] = np.asarray(leaf)
  data_dir = os.path.join(step_dir, DATA_ITEM)
  for root, _, files in os.walk(data_dir):
    for name in files:
      if name == COMMIT_MARKER:
        continue
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[f"{DATA_ITEM}/{os.path.relpath(path, data_dir)}"] = f.read()
  return out


def category(key: str) -> str:
  """Which part of the run a key of `read_step` belongs to (one of CATEGORIES)."""
  if key.startswith("ema/"):
    return "EMA"
  if key.startswith(f"{DATA_ITEM}/"):
    return "data position"
  if key.startswith("state/opt_state"):
    return "optimizer state"
  if key.startswith(("state/params", "state/frozen")):
    return "params"
  return "other state"


@dataclasses.dataclass(frozen=True)
class Difference:
  key: str
  what: str

  @property
  def category(self) -> str:
    return category(self.key)


def _same(a, b) -> str:
  """'' when equal bit for bit, else what differs."""
  if isinstance(a, bytes) or isinstance(b, bytes):
    return "" if a == b else "stored bytes differ"
  if a.dtype != b.dtype or a.shape != b.shape:
    return f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
  if a.tobytes() == b.tobytes():
    return ""
  flat_a, flat_b = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
  per_item = a.dtype.itemsize
  differing = np.unique(np.flatnonzero(flat_a != flat_b) // per_item)
  return f"{len(differing)} of {a.size} elements differ"


def compare(a: dict, b: dict) -> list[Difference]:
  """Every key present in only one of two `read_step` results, or whose bytes differ."""
  out = [Difference(k, "only in the first") for k in sorted(a.keys() - b.keys())]
  out += [Difference(k, "only in the second") for k in sorted(b.keys() - a.keys())]
  for key in sorted(a.keys() & b.keys()):
    what = _same(a[key], b[key])
    if what:
      out.append(Difference(key, what))
  return out
