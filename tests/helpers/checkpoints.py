"""Whole checkpoints as NumPy, read without a model, and their comparison."""
import glob
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import sharding
from psvae_jax import train_state as ts
from psvae_jax.tree_paths import flatten_dotted


def restore_all(workdir, step=None):
  """Every stored array of a run's checkpoint as numpy, keyed by item and path, plus the data
  position; restored without a model (targets built from the stored metadata)."""
  directory = ckpt_lib.checkpoint_dir(workdir)
  reader = ckpt_lib.Checkpointer(directory, create=False, async_save=False)
  step = reader.latest_step() if step is None else step
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  out = {}
  for item in ("state", "ema"):
    path = os.path.join(directory, str(step), item)
    if not os.path.isdir(path):  # no 'ema' without EMA
      continue
    meta = ocp.StandardCheckpointer().metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    tree = ocp.StandardCheckpointer().restore(path, target)
    for name, leaf in flatten_dotted(tree).items():
      out[f"{item}/{name}"] = np.asarray(leaf)
  data = {}  # one position per process
  for path in sorted(glob.glob(os.path.join(directory, str(step), "data", "*.json"))):
    with open(path) as f:
      data[os.path.basename(path)] = f.read()
  out["data"] = data
  reader.close()
  return step, out


def assert_same_checkpoint(a, b):
  """Two `restore_all` results hold the same arrays and the same data position."""
  assert a.keys() == b.keys()
  for key in a:
    if key == "data":
      assert a[key] == b[key], "data iterator positions differ"
    else:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def restore_params(config, workdir):
  """(step, merged raw params as a nested dict, extras) of `workdir`'s newest checkpoint,
  restored through `config`'s task layout on `config.mesh`."""
  from helpers.runs import read_run
  step, restored = read_run(workdir, config, sharding.make_mesh(config.mesh))
  return step, ts.all_params(restored["state"]).to_pure_dict(), restored.get("extras", {})
