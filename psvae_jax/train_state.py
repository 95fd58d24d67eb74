"""The training state: how a task's model is split, placed on the mesh and initialised.

State layout (a plain dict pytree, saved as the checkpoint's 'state' item):
  step           int32 scalar
  params         nnx.State of trainable nnx.Param (optimised, EMA'd)
  frozen         nnx.State of frozen nnx.Param (config.optim.frozen + the task's own)
  other          nnx.State of every other variable (e.g. batch statistics)
  opt_state      optax state of `params`
  nonfinite_step int32: first step whose loss/grad was non-finite (-1 = none)
  skipped        int32: number of updates skipped for non-finite values
EMA (`ema`, same structure as params) is kept beside it as its own checkpoint item.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from psvae_jax import sharding
from psvae_jax.optim import build_optimizer, compile_regex
from psvae_jax.tasks.base import Task
from psvae_jax.tree_paths import path_keys, path_str


def frozen_filter(patterns: list[re.Pattern]) -> Callable:
  """NNX filter: a Param whose dotted path matches any pattern."""

  def is_frozen(path, value) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    name = path_str(path)
    return any(p.search(name) for p in patterns)

  return is_frozen


@dataclasses.dataclass
class TrainSetup:
  """Everything the loop needs to rebuild and shard the model, and the optimizer it steps with."""
  graphdef: Any
  filters: tuple  # (trainable, frozen, other) NNX filters for nnx.split
  tx: optax.GradientTransformation
  abstract_state: dict  # ShapeDtypeStructs with shardings
  abstract_ema: Any  # or None
  state_shardings: dict
  ema_shardings: Any

  def merge(self, params, frozen, other) -> nnx.Module:
    return nnx.merge(self.graphdef, params, frozen, other)


def abstract_split(build: Callable[[], nnx.Module], filters: tuple):
  """(graphdef, states) of the model `build()` makes, as ShapeDtypeStructs (no memory).

  `jax.eval_shape` rather than `nnx.eval_shape`: the latter resolves the parameters' logical
  axis names against the current mesh, which only knows physical axes.
  """
  box = {}

  def states():
    graphdef, *parts = nnx.split(build(), *filters)
    box["graphdef"] = graphdef
    return tuple(parts)

  parts = jax.eval_shape(states)
  return box["graphdef"], parts


def _frozen_patterns(task: Task, config) -> list[re.Pattern]:
  patterns = []
  for key, pattern in (("optim.frozen", config.optim.frozen),
                       (f"{type(task).__name__}.frozen_params", task.frozen_params)):
    compiled = compile_regex(pattern, key)
    if compiled is not None:
      patterns.append(compiled)
  return patterns


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _split(model, filters):
  _, params, frozen, other = nnx.split(model, *filters)
  return params, frozen, other


def make_train_setup(task: Task, config, mesh: Mesh) -> TrainSetup:
  """Builds the model abstractly (no memory), derives filters, optimizer and shardings."""
  is_frozen = frozen_filter(_frozen_patterns(task, config))
  trainable = nnx.All(nnx.Param, nnx.Not(is_frozen))
  filters = (trainable, is_frozen, ...)
  graphdef, (params, frozen, other) = abstract_split(
      lambda: task.build_model(nnx.Rngs(config.seed)), filters)
  if not jax.tree.leaves(params):
    raise ValueError("the model has no trainable parameters: check config.optim.frozen "
                     f"({config.optim.frozen!r}) and the task's frozen_params")
  tx = build_optimizer(config.optim, config.total_steps, params)
  abstract_opt = jax.eval_shape(tx.init, params)

  param_sh = sharding.state_shardings(params, mesh)
  opt_sh = _optimizer_shardings(abstract_opt, params, param_sh, mesh)
  scalar = sharding.replicated(mesh)
  state_sh = {
      "step": scalar,
      "params": param_sh,
      "frozen": sharding.state_shardings(frozen, mesh),
      "other": sharding.state_shardings(other, mesh),
      "opt_state": opt_sh,
      "nonfinite_step": scalar,
      "skipped": scalar,
  }
  scalar_i32 = jax.ShapeDtypeStruct((), jnp.int32)
  abstract_state = {
      "step": scalar_i32, "params": params, "frozen": frozen, "other": other,
      "opt_state": abstract_opt, "nonfinite_step": scalar_i32, "skipped": scalar_i32,
  }
  abstract_state = _with_shardings(abstract_state, state_sh)
  use_ema = config.optim.ema_decay > 0
  ema_sh = param_sh if use_ema else None
  abstract_ema = _with_shardings(params, param_sh) if use_ema else None
  return TrainSetup(graphdef, filters, tx, abstract_state, abstract_ema, state_sh, ema_sh)


def _optimizer_shardings(abstract_opt, params, param_sh, mesh: Mesh):
  """Optimizer leaves shard like the parameter they mirror; everything else is replicated.

  optax states embed copies of the params tree (mu, nu, ...): a leaf whose path ends with a
  parameter's path and has its shape takes that parameter's sharding.
  """
  by_path = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                              jax.tree.leaves(param_sh)):
    by_path[path_keys(path)] = (leaf.shape, sh)
  replicated = sharding.replicated(mesh)

  def assign(path, leaf):
    keys = path_keys(path)
    for i in range(len(keys)):
      match = by_path.get(keys[i:])
      if match is not None and match[0] == leaf.shape:
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(assign, abstract_opt)


def init_state(task: Task, config, layout: TrainSetup):
  """Jitted, sharded initialisation: no host ever materialises the full model."""

  def init():
    model = task.build_model(nnx.Rngs(config.seed))
    params, frozen, other = _split(model, layout.filters)
    state = {
        "step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen, "other": other,
        "opt_state": layout.tx.init(params), "nonfinite_step": jnp.full((), -1, jnp.int32),
        "skipped": jnp.zeros((), jnp.int32),
    }
    return state

  return jax.jit(init, out_shardings=layout.state_shardings)()


def init_ema(state, layout: TrainSetup):
  """EMA starts as a copy of the trainable params (None when EMA is off)."""
  if layout.ema_shardings is None:
    return None
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=layout.ema_shardings)(
      state["params"])


def num_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def all_params(state) -> nnx.State:
  """Trainable and frozen params merged into one State (the model's full nnx.Param set)."""
  return nnx.merge_state(state["params"], state["frozen"])


def split_params(layout: TrainSetup, merged: nnx.State):
  """Inverse of `all_params`: splits a full Param state back into (trainable, frozen)."""
  trainable, frozen = layout.filters[0], layout.filters[1]
  return merged.filter(trainable), merged.filter(frozen)
