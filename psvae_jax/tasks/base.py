"""The contract between a training stage (task) and the one shared training loop.

A task owns its model, losses, evaluation and sampling; the loop (psvae_jax/train.py) owns
sharding, optimisation, EMA, checkpoints, logging and the data iterator.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ParentRun:
  """What a stage takes from the run it starts from (`config.init` = that run's workdir).

  `psvae_jax.runs.init_params` fills it: it checks the parent's task and config, copies the
  parameter groups (EMA weights where the parent kept them) and hands the extras to
  `Task.from_parent`; `runs.with_parent_config` copies the inherited config sections first.
  """
  task: str  # the parent's config.task
  groups: Mapping[str, str]  # this model's parameter group -> the parent's group
  optional: tuple[str, ...] = ()  # groups that keep their values when the parent lacks them
  # Groups that take only the top-level entries this model has from the parent's (E_s
  # without D_s); in the others every entry must match.
  partial: tuple[str, ...] = ()
  # Entries of a group that the parent's group lacks and that keep their initial values (new
  # parameters).
  new_entries: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  match: tuple[str, ...] = ()  # config.model keys that must equal the parent's
  # This config's dotted section <- the parent config's dotted section (e.g. the autoencoder's
  # model section), copied before the model is built; `local` keys in it stay this run's.
  inherit: Mapping[str, str] = dataclasses.field(default_factory=dict)
  local: tuple[str, ...] = ("remat",)
  extras: tuple[str, ...] = ()  # checkpoint extras the parent must hold


class Task:
  """Base class of a stage. Subclasses override the methods below.

  Everything passed to `loss` and `evaluate` runs inside `jax.jit`: it must be traceable and
  free of host callbacks.
  """

  #: Regex (re.search on dotted parameter paths) of parameters the task always freezes.
  frozen_params: str = ""
  #: What `config.init` (a previous run) provides; None: config.init is not a run.
  parent: ParentRun | None = None

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  # --- model -----------------------------------------------------------------------------
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the full model (trainable and frozen parts). Called under `jax.eval_shape` and
    again inside a jitted, sharded init."""
    raise NotImplementedError

  def load_init(self, params: nnx.State, path: str) -> nnx.State:
    """Called on every fresh start (nothing to resume), after the `parent` run's groups are
    filled: returns `params` (all nnx.Param of the model, sharded) with pretrained weights
    filled in, from `path` (`config.init`, may be '') when it is not a run, and from any other
    weights the task's config names. Must raise on anything it cannot load."""
    if path and self.parent is None:
      raise NotImplementedError(f"task {type(self).__name__} does not support config.init")
    return params

  def from_parent(self, params: nnx.State, parent_groups: set[str], extras: dict[str, Any],
                  what: str) -> nnx.State:
    """Receives what the parent run gave besides its parameter groups: the names of the
    groups it had (`parent_groups`) and its checkpoint extras; `what` names the run and step
    for error messages. Returns `params`."""
    return params

  def check_fresh_start(self) -> None:
    """Called when the run starts from scratch (no checkpoint, no config.init); a task that
    must not train from random weights raises a ConfigError saying what to set."""

  # --- data ------------------------------------------------------------------------------
  def prepare_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Host-side conversion of a data batch into the numeric arrays the step consumes
    (e.g. tokenising captions). Default: keep numeric arrays, drop strings."""
    return {k: v for k, v in batch.items() if np.asarray(v).dtype.kind not in "OUS"}

  # --- training --------------------------------------------------------------------------
  def loss(self, model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array,
           step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss to minimise w.r.t. trainable params and a dict of scalar metrics."""
    raise NotImplementedError

  def evaluate(self, model: nnx.Module, batch: Mapping[str, jax.Array],
               rng: jax.Array) -> dict[str, jax.Array]:
    """Scalar metrics on one held-out batch (averaged over batches by the loop)."""
    return {}

  def sample(self, model: nnx.Module, rng: jax.Array, batch: Mapping[str, jax.Array],
             step: int) -> dict[str, jax.Array | np.ndarray]:
    """Images to log: name -> uint8 (N, H, W, 3), given one held-out batch (global arrays).
    Runs outside the step's jit."""
    return {}

  def flops_per_example(self) -> float:
    """Analytic training FLOPs per example (forward + backward), for TFLOP/s and MFU."""
    return 0.0

  def finalize(self, model: nnx.Module, training_batches) -> None:
    """Called once after the last step, before the final checkpoint (e.g. to compute latent
    statistics that `checkpoint_extras` then saves). `training_batches(n)` yields n global
    training batches (the task's prepared fields, sharded on the run's mesh) from an iterator
    seeded apart from the run's own, whose position does not move."""

  def checkpoint_extras(self, model: nnx.Module) -> dict[str, Any]:
    """JSON-serialisable extras saved with each checkpoint (e.g. latent statistics)."""
    return {}

  def restore_extras(self, extras: dict[str, Any]) -> None:
    """Receives the extras of the checkpoint a run resumed from."""
