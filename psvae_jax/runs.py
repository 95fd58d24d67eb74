"""Another run's checkpoint: its stored config, task, weights and extras, on the caller's mesh.

The only code that reads a run other than the workdir's own: the tools that evaluate or sample
a finished run, and the stages that start from the previous stage (`config.init`, declared by
the task's `parent`). The checkpoint's own config decides the task and the model's shape;
weights restore through abstract targets onto the mesh given, whatever mesh the run trained
on. A damaged newest step falls back to the previous complete one with a warning, as the
workdir's own resume does (`Checkpointer.restore_newest`).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import sharding
from psvae_jax import train_state as ts
from psvae_jax.config_base import ConfigError
from psvae_jax.storage_retry import RetryPolicy
from psvae_jax.tasks import get_task, task_class
from psvae_jax.tasks.autoencoder_parts import fill_subtree


def default_mesh(devices=None) -> Mesh:
  """Every device (or `devices`) on the 'data' axis: replicated weights, batch-parallel eval."""
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)


def run_config(path: str, step: int | None = None,
               read_retry: RetryPolicy | None = None) -> ml_collections.ConfigDict:
  """The config stored with a run's checkpoint (the latest one by default)."""
  return ml_collections.ConfigDict(
      ckpt_lib.read_config(ckpt_lib.resolve_checkpoint_dir(path), step, read_retry))


@dataclasses.dataclass
class RunWeights:
  """A run's restored weights. `params`: every nnx.Param of its model, the trainable ones from
  its EMA when `weights == 'ema'`; `other`: its non-Param variables."""
  task: Any
  config: ml_collections.ConfigDict
  setup: ts.TrainSetup
  params: nnx.State
  frozen: nnx.State
  other: nnx.State
  extras: dict[str, Any]
  step: int
  weights: str  # 'ema' or 'params'
  checkpoint_dir: str

  def model(self) -> nnx.Module:
    """The NNX model holding these weights."""
    return self.setup.merge(self.params.filter(self.setup.filters[0]), self.frozen, self.other)


def load_run(path: str, mesh: Mesh, *, use_ema: bool = True, step: int | None = None,
             read_retry: RetryPolicy | None = None) -> RunWeights:
  """A run's weights placed on `mesh`.

  Args:
    path: the run's directory or its checkpoints/ directory; local or gs://.
    mesh: where to place the weights (the caller's: a training run's own mesh, a tool's).
    use_ema: the EMA weights for the trainable parameters when the run's config keeps them
      (frozen parameters and other variables come from the train state either way).
    step: checkpoint step; default the newest complete one (damaged newer steps are skipped
      with a warning).
    read_retry: how reads retry transient storage errors (default: config.io's defaults).
  Raises:
    CheckpointError: no complete checkpoint, a step that does not exist, a config keeping EMA
      whose checkpoint has none, or one that does not match its own config.
  """
  directory = ckpt_lib.resolve_checkpoint_dir(path)
  reader = ckpt_lib.Checkpointer(directory, create=False, async_save=False, read_retry=read_retry)
  try:
    if step is not None and int(step) not in reader.all_steps():
      raise ckpt_lib.CheckpointError(
          f"{directory}: no checkpoint at step {step}; have {sorted(reader.all_steps())}")
    if not reader.all_steps():
      raise ckpt_lib.CheckpointError(f"{directory}: no complete checkpoint")
    config = ml_collections.ConfigDict(ckpt_lib.read_config(directory, step, reader.read_retry))
    task = get_task(config)
    with jax.set_mesh(mesh):
      setup = ts.make_train_setup(task, config, mesh)
      with_ema = use_ema and setup.abstract_ema is not None
      targets = dict(abstract_state=setup.abstract_state,
                     abstract_ema=setup.abstract_ema if with_ema else None)
      # The optimizer state is restored too (Checkpointer restores whole items) and dropped
      # right after, so peak memory is that of the training state.
      if step is None:
        step, restored = reader.restore_newest(**targets)
      else:
        step, restored = int(step), reader.restore(int(step), **targets)
  finally:
    reader.close()
  state = restored["state"]
  trainable = restored["ema"] if with_ema else state["params"]
  extras = dict(restored.get("extras") or {})
  task.restore_extras(extras)
  weights = "ema" if with_ema else "params"
  logging.info("read %s step %d (%s weights) onto mesh %s", directory, step, weights,
               dict(mesh.shape))
  return RunWeights(task=task, config=config, setup=setup,
                    params=nnx.merge_state(trainable, state["frozen"]), frozen=state["frozen"],
                    other=state["other"], extras=extras, step=step, weights=weights,
                    checkpoint_dir=directory)


def load_run_model(path: str, *, use_ema: bool = True, mesh: Mesh | None = None,
                   step: int | None = None):
  """A run's model with its trained weights, placed on `mesh` (default `default_mesh()`).

  Returns (task, model, config, extras): the task built from the stored config (its
  `restore_extras` already called), the NNX model, the stored config, and the checkpoint's
  JSON extras (e.g. 'latent_stats') plus 'step', 'weights' ('ema' or 'params') and
  'checkpoint_dir'. Raises as `load_run`.
  """
  run = load_run(path, default_mesh() if mesh is None else mesh, use_ema=use_ema, step=step)
  extras = {**run.extras, "step": run.step, "weights": run.weights,
            "checkpoint_dir": run.checkpoint_dir}
  return run.task, run.model(), run.config, extras


# --- starting a stage from its parent run --------------------------------------------------

def _get(config, dotted: str):
  for key in dotted.split("."):
    config = config[key] if key else config
  return config


def _comparable(value):
  """A config value as compared across JSON round trips (tuples and lists alike)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, (list, tuple)):
    return [_comparable(v) for v in value]
  if isinstance(value, dict):
    return {k: _comparable(v) for k, v in value.items()}
  return value


def with_parent_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the sections its task inherits from the `config.init` run copied in (e.g.
  T2I's config.model.autoencoder <- the PS-VAE run's config.model), the `local` keys kept.
  Unchanged when the task declares no parent or config.init is empty (the config's own
  sections are then the local default for a start from scratch)."""
  parent = task_class(config.task).parent
  if parent is None or not config.get("init") or not parent.inherit:
    return config
  stored = run_config(config.init, read_retry=RetryPolicy.from_config(config.get("io")))
  _check_parent_task(parent, stored, config.init)
  return inherit_parent_sections(config, stored)


def inherit_parent_sections(config: ml_collections.ConfigDict,
                            parent_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the sections its task's `parent.inherit` names copied from `parent_config`
  (the parent run's stored config), the `local` keys kept; locked as `config` was."""
  parent = task_class(config.task).parent
  locked = config.is_locked
  config = ml_collections.ConfigDict(config.to_dict())
  for ours, theirs in parent.inherit.items():
    section = ml_collections.ConfigDict(_get(parent_config, theirs).to_dict())
    local = _get(config, ours)
    for key in parent.local:
      if key in local:
        section[key] = local[key]
    head, _, last = ours.rpartition(".")
    _get(config, head)[last] = section
  if locked:
    config.lock()
  return config


def _check_parent_task(parent, stored, path: str) -> None:
  if stored.get("task") != parent.task:
    raise ConfigError(f"config.init={path!r} is a {stored.get('task')!r} run; this stage starts "
                      f"from a {parent.task!r} run's workdir")


def check_parent_config(parent, config, stored, path: str) -> None:
  """config.model[k] == the parent's for every k in `parent.match`; differences are listed."""
  problems = []
  for key in parent.match:
    if key not in stored.model:
      problems.append(f"{key}: not in the {parent.task} run's config")
    elif _comparable(config.model[key]) != _comparable(stored.model[key]):
      problems.append(f"{key}={_comparable(config.model[key])!r} but the run has "
                      f"{_comparable(stored.model[key])!r}")
  if problems:
    raise ConfigError(f"config.model does not match the {parent.task} run at {path} (set "
                      "--config.model.<key> to the run's values): " + "; ".join(problems))


def init_from_parent(task, params: nnx.State, path: str, mesh: Mesh) -> nnx.State:
  """`params` with the groups `task.parent` declares filled from the run at `path` (read onto
  `mesh`), after checking its task, matching config keys and extras; the rest goes to
  `task.from_parent`."""
  parent = task.parent
  read_retry = RetryPolicy.from_config(task.config.get("io"))
  _check_parent_task(parent, run_config(path, read_retry=read_retry), path)
  run = load_run(path, mesh, read_retry=read_retry)
  check_parent_config(parent, task.config, run.config, path)
  what = f"the {parent.task} run {path} (step {run.step})"
  missing = [k for k in parent.extras if not run.extras.get(k)]
  if missing:
    raise ckpt_lib.CheckpointError(f"{what} holds no checkpoint extras {missing}")
  have = set(run.params.keys())
  for group, source_group in parent.groups.items():
    if group not in params:
      continue
    if source_group not in have:
      if group in parent.optional:
        continue
      raise ckpt_lib.CheckpointError(f"{what} has no '{source_group}' parameters to "
                                     f"initialise '{group}'")
    target, source = params[group], run.params[source_group]
    new = parent.new_entries.get(group, ())
    taken = nnx.State({k: target[k] for k in target.keys() if k not in new})
    if group in parent.partial:
      source = nnx.State({k: source[k] for k in taken.keys() if k in source})
    fill_subtree(nnx.State({group: taken}), group, source, what=what)
  logging.info("%s: %s from %s (%s weights)", type(task).__name__, sorted(parent.groups),
               run.checkpoint_dir, run.weights)
  return task.from_parent(params, have, run.extras, what)


def init_params(task, params: nnx.State, path: str, mesh: Mesh) -> nnx.State:
  """A fresh start's parameters: the parent run's groups (when the task declares a parent and
  `path` is set), then the task's own `load_init`."""
  if path and task.parent is not None:
    params = init_from_parent(task, params, path, mesh)
  return task.load_init(params, path)
