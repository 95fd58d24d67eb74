"""Rebuilds a finished run's model from WORKDIR/checkpoints, for evaluation and sampling tools.

The checkpoint's own config JSON decides the task and the model's shape, so a tool needs only
the workdir. Weights restore through abstract targets onto the mesh given (default: every
device on 'data', parameters replicated), whatever mesh the run trained on.
"""
from __future__ import annotations

import logging

import jax
import ml_collections
from jax.sharding import Mesh

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import sharding
from psvae_jax import train_state as ts
from psvae_jax.tasks import get_task


def default_mesh(devices=None) -> Mesh:
  """Every device (or `devices`) on the 'data' axis: replicated weights, batch-parallel eval."""
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)


def run_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config stored with a run's checkpoint (the latest one by default)."""
  return ml_collections.ConfigDict(
      ckpt_lib.read_config(ckpt_lib.resolve_checkpoint_dir(workdir), step))


def load_run_model(workdir: str, *, use_ema: bool = True, mesh: Mesh | None = None,
                   step: int | None = None):
  """A run's model with its trained weights, placed on `mesh`.

  Args:
    workdir: the run's directory (or its checkpoints/ directory); local or gs://.
    use_ema: use the EMA weights for the trainable parameters when the run kept them
      (frozen parameters and other variables come from the train state either way).
    mesh: where to place the weights; default `default_mesh()`.
    step: checkpoint step; default the latest complete one.
  Returns:
    (task, model, config, extras): the task built from the stored config (its
    `restore_extras` already called), the NNX model, the stored config (a ConfigDict), and a
    dict holding the checkpoint's JSON extras (e.g. 'latent_stats') plus 'step',
    'weights' ('ema' or 'params') and 'checkpoint_dir'.
  Raises:
    CheckpointError: no complete checkpoint, or one that does not match its own config.
  """
  directory = ckpt_lib.resolve_checkpoint_dir(workdir)
  reader = ckpt_lib.Checkpointer(directory, create=False, async_save=False)
  try:
    step = reader.latest_step() if step is None else int(step)
    if step is None:
      raise ckpt_lib.CheckpointError(f"{directory}: no complete checkpoint to evaluate")
    if step not in reader.all_steps():
      raise ckpt_lib.CheckpointError(
          f"{directory}: no checkpoint at step {step}; have {sorted(reader.all_steps())}")
    config = ml_collections.ConfigDict(ckpt_lib.read_config(directory, step))
    task = get_task(config)
    mesh = default_mesh() if mesh is None else mesh
    with jax.set_mesh(mesh):
      layout = ts.make_train_setup(task, config, mesh)
      with_ema = (use_ema and layout.abstract_ema is not None
                  and "ema" in reader.item_names(step))
      if use_ema and layout.abstract_ema is not None and not with_ema:
        raise ckpt_lib.CheckpointError(
            f"{directory}/{step}: the run's config keeps EMA weights (optim.ema_decay="
            f"{config.optim.ema_decay}) but the checkpoint has no 'ema' item; pass "
            "use_ema=False to evaluate the raw parameters")
      # The optimizer state is restored too (Checkpointer restores whole items); it is dropped
      # right after, so peak memory is that of the training state.
      restored = reader.restore(step, abstract_state=layout.abstract_state,
                                abstract_ema=layout.abstract_ema if with_ema else None)
  finally:
    reader.close()
  state = restored["state"]
  params = restored["ema"] if with_ema else state["params"]
  model = layout.merge(params, state["frozen"], state["other"])
  checkpoint_extras = dict(restored.get("extras") or {})
  task.restore_extras(checkpoint_extras)
  extras = {**checkpoint_extras, "step": step, "weights": "ema" if with_ema else "params",
            "checkpoint_dir": directory}
  logging.info("restored %s step %d (%s weights) onto mesh %s", directory, step,
               extras["weights"], dict(mesh.shape))
  return task, model, config, extras
