"""Orbax checkpoints of a run: train state, EMA, data-iterator position, config, extras.

Layout: WORKDIR/checkpoints/<step>/{state, ema, data, config, extras}. Saves are async; a step
directory only appears under its final name once complete (Orbax commits by rename), so a
crash mid-write leaves the previous step as the latest. Restores always go through abstract
targets that carry the *current* run's shardings, so a checkpoint restores onto a different
mesh shape or device count.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "ema", "data", "config", "extras")


class CheckpointError(RuntimeError):
  """A checkpoint could not be restored; the message names the directory and the cause."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def _is_gcs(path: str) -> bool:
  return path.startswith("gs://")


def _abs(path: str) -> str:
  return path if _is_gcs(path) else os.path.abspath(path)


_HANDLER_CONFIGURED = False


def _configure_array_handler() -> None:
  """On CPU, write replicated arrays from one replica.

  Orbax's replica-parallel writes slice every replicated array per device with a jitted slice
  per (shape, device): on simulated CPU devices those compiles cost far more than the write.
  Accelerators keep the default (parallel writes across replicas).
  """
  global _HANDLER_CONFIGURED
  if _HANDLER_CONFIGURED:
    return
  _HANDLER_CONFIGURED = True
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
  """The run's CheckpointManager with the project's items and retention policy."""

  def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0,
               async_save: bool = True, create: bool = True):
    _configure_array_handler()
    self.directory = _abs(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        keep_period=keep_every if keep_every > 0 else None,
        enable_async_checkpointing=async_save,
        create=create,
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  # --- queries -----------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  # --- save --------------------------------------------------------------------------------
  def save(self, step: int, *, state, ema=None, data_iterator=None, config_json: str | None = None,
           extras: dict | None = None, force: bool = False) -> bool:
    """Starts an (async) save of all items at `step`."""
    import grain

    items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
    if ema is not None:
      items["ema"] = ocp.args.StandardSave(ema)
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config_json is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config_json))
    items["extras"] = ocp.args.JsonSave(extras or {})
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  # --- restore -----------------------------------------------------------------------------
  def item_names(self, step: int) -> set[str]:
    step_dir = os.path.join(self.directory, str(step))
    if _is_gcs(step_dir):
      from etils import epath
      return {p.name for p in epath.Path(step_dir).iterdir()}
    return set(os.listdir(step_dir)) if os.path.isdir(step_dir) else set()

  def restore(self, step: int, *, abstract_state=None, abstract_ema=None, data_iterator=None,
              with_extras: bool = True) -> dict[str, Any]:
    """Restores the requested items at `step` onto the abstract targets' shardings."""
    import grain

    present = self.item_names(step)
    items: dict[str, Any] = {}
    if abstract_state is not None:
      items["state"] = ocp.args.StandardRestore(abstract_state)
    if abstract_ema is not None:
      if "ema" not in present:
        raise CheckpointError(f"{self.directory}/{step}: has no 'ema' item but EMA is enabled "
                              "(config.optim.ema_decay > 0)")
      items["ema"] = ocp.args.StandardRestore(abstract_ema)
    if data_iterator is not None:
      if "data" not in present:
        raise CheckpointError(f"{self.directory}/{step}: has no 'data' item (data iterator "
                              "position); cannot resume the data order exactly")
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    if with_extras and "extras" in present:
      items["extras"] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError, OSError, FileNotFoundError) as e:
      details = []
      for name, target in (("state", abstract_state), ("ema", abstract_ema)):
        if target is not None:
          details += tree_mismatches(os.path.join(self.directory, str(step), name), target, name)
      hint = ("\n  " + "\n  ".join(details[:30])) if details else ""
      raise CheckpointError(f"cannot restore {self.directory}/{step}: "
                            f"{type(e).__name__}: {e}{hint}") from e
    return {k: restored[k] for k in items}


def _key_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_mismatches(item_dir: str, abstract_tree, label: str) -> list[str]:
  """Human-readable differences between a stored PyTree item and the tree a run expects:
  entries missing from the checkpoint, entries the model does not have, and shape changes."""
  try:
    stored = ocp.StandardCheckpointer().metadata(item_dir).item_metadata
  except (ValueError, OSError, FileNotFoundError) as e:
    return [f"{label}: metadata unreadable ({e})"]
  shapes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]:
    shapes[".".join(_key_names(path))] = tuple(getattr(leaf, "shape", ()) or ())
  wanted = {".".join(_key_names(path)): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]}
  out = [f"{label}: {name}: checkpoint {shapes[name]} vs model {shape}"
         for name, shape in wanted.items() if name in shapes and shapes[name] != shape]
  out += [f"{label}: missing in checkpoint: {name}" for name in wanted if name not in shapes]
  out += [f"{label}: not in the model: {name}" for name in shapes if name not in wanted]
  return sorted(out, key=lambda line: ("opt_state" in line, line))  # parameters first


def read_config(directory: str, step: int | None = None) -> dict:
  """The config JSON stored with a checkpoint (latest step by default)."""
  ckpt = Checkpointer(directory, create=False, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{directory}: no complete checkpoint")
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return restored["config"]


def resolve_checkpoint_dir(path: str) -> str:
  """Accepts a run's workdir or its checkpoints/ dir; returns the checkpoints dir."""
  candidate = os.path.join(path, "checkpoints")
  if _is_gcs(path) or os.path.isdir(candidate):
    return candidate if not _is_gcs(path) else candidate
  return path


def restore_tree(path: str, abstract_tree, *, what: str):
  """Restores a standalone Orbax PyTree checkpoint (e.g. converted weights) onto shardings.

  The stored tree must match `abstract_tree`'s structure and shapes; mismatches are reported.
  """
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(_abs(path), abstract_tree)
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    raise CheckpointError(f"cannot restore {what} from {path}: {type(e).__name__}: {e}") from e


def log_restore(source: str, step: int) -> None:
  if jax.process_index() == 0:
    logging.info("restored step %d from %s", step, source)
