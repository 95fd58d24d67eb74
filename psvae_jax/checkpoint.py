"""Orbax checkpoints of a run: train state, EMA, data-iterator position, config, extras.

Layout: WORKDIR/checkpoints/<step>/{state, ema, data, config, extras}. Saves are async; a step
directory only appears under its final name once complete (Orbax writes '<step>.orbax-checkpoint-
tmp' and renames it), so a crash mid-write leaves the previous step as the latest; the unfinished
directory is reported and removed when the run restarts. A finalized step that was damaged later
(deleted, truncated or altered files: each finalized step carries a SHA-256 manifest, see
`checkpoint_checksums`) is detected on resume (`restore_newest`): it is skipped with a warning
naming the step and the cause, and the newest complete step is used instead. Restores
always go through abstract targets that carry the *current* run's shardings, so a checkpoint
restores onto a different mesh shape or device count, and retry transient storage errors
(`storage_retry`, config.io) before anything is called damaged.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from psvae_jax import checkpoint_checksums as checksums
from psvae_jax import storage_retry
from psvae_jax.tree_paths import flatten_dotted
from psvae_jax.errors import UserError

PYTREE_ITEMS = ("state", "ema")
# Orbax's name for a step directory still being written ('<step>.orbax-checkpoint-tmp...').
UNFINISHED_MARKER = ".orbax-checkpoint-tmp"
# Orbax's per-step file listing the items that were saved (written when the save starts).
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
# A damaged step is renamed to '<step>.corrupt' when a run resumes past it (kept for inspection;
# Orbax no longer sees it as a step, so the run can write that step again).
SET_ASIDE_SUFFIX = ".corrupt"


class CheckpointError(UserError, RuntimeError):
  """A checkpoint could not be restored; the message names the directory and the cause."""


class IncompleteCheckpointError(CheckpointError):
  """A step directory is incomplete or damaged: an item or file is missing or unreadable."""

  def __init__(self, step_dir: str, cause: str):
    super().__init__(f"{step_dir}: incomplete or damaged checkpoint: {cause}")
    self.step_dir, self.cause = step_dir, cause


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
               async_save: bool = True, create: bool = True, checksums: bool = True,
               read_retry: storage_retry.RetryPolicy | None = None):
    """`create=False` opens another run's checkpoints for reading: nothing there is removed.
    `checksums`: write a SHA-256 manifest into each step once it is finalized (steps that have
    one are always checked before a restore). `read_retry`: how restores retry transient
    storage errors (default: config.io's defaults)."""
    _configure_array_handler()
    self.directory = _abs(directory)
    self.checksums = checksums
    self.read_retry = read_retry or storage_retry.RetryPolicy()
    self._steps_without_manifest: list[int] = []
    # Process 0 hashes finalized steps in this thread while training goes on (see
    # _write_manifests); its failure is raised at the next save, wait or close.
    self._hashing: threading.Thread | None = None
    self._hashing_error: Exception | None = None
    if create:
      for name in unfinished_writes(self.directory):
        logging.warning("checkpoint %s/%s was never finalized (the writing process stopped "
                        "mid-save); it is ignored and removed", self.directory, name)
        if jax.process_index() == 0:  # now, not in Orbax's background cleanup
          epath.Path(self.directory, name).rmtree()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        keep_period=keep_every if keep_every > 0 else None,
        enable_async_checkpointing=async_save,
        create=create,
        # Only the run that owns the directory removes unfinished writes: a reader (config.resume,
        # tools) could otherwise delete a save that a live run is still writing.
        cleanup_tmp_directories=create,
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
    # The previous save is finalized first (Orbax waits for it before starting this one); its
    # manifest is then written in the background.
    self._write_manifests(background=True)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved and self.checksums:
      self._steps_without_manifest.append(step)
    return saved

  def wait(self) -> None:
    """Waits for the running save and writes the manifests of every finalized step."""
    self._write_manifests(background=False)

  def close(self) -> None:
    self._write_manifests(background=False)
    self.manager.close()

  def _write_manifests(self, *, background: bool) -> None:
    """Waits for the running save and for the hashing thread, then (process 0) hashes the steps
    saved since the last call that retention has not removed: in a new thread when
    `background`, else here."""
    self.manager.wait_until_finished()
    self._join_hashing()
    steps, self._steps_without_manifest = self._steps_without_manifest, []
    if not steps or jax.process_index() != 0:
      return
    kept = set(self.all_steps())
    steps = [s for s in steps if s in kept]
    if not steps:
      return
    if not background:
      self._hash_steps(steps)
      self._join_hashing()  # raises what the hashing met
      return
    self._hashing = threading.Thread(target=self._hash_steps, args=(steps,), daemon=True,
                                     name="checkpoint-manifests")
    self._hashing.start()

  def _hash_steps(self, steps: list[int]) -> None:
    for step in steps:
      step_dir = self.step_dir(step)
      try:
        checksums.write_manifest(step_dir)
      except FileNotFoundError as e:
        if epath.Path(step_dir).exists():
          self._hashing_error = e
          return
        # Retention removed the step while it was hashed: nothing left to guard.
        logging.info("checkpoint %s was removed before its manifest was written", step_dir)
      except (OSError, ValueError) as e:
        self._hashing_error = e
        return

  def _join_hashing(self) -> None:
    if self._hashing is not None:
      self._hashing.join()
      self._hashing = None
    if self._hashing_error is not None:
      error, self._hashing_error = self._hashing_error, None
      raise CheckpointError(f"writing a checksum manifest under {self.directory} failed: "
                            f"{type(error).__name__}: {error}") from error

  # --- restore -----------------------------------------------------------------------------
  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def item_names(self, step: int) -> set[str]:
    step_dir = epath.Path(self.step_dir(step))
    return {p.name for p in step_dir.iterdir()} if step_dir.is_dir() else set()

  def verify(self, step: int) -> None:
    """Checks that every item the save started is present and its metadata readable, and the
    files against the step's checksum manifest when it has one.

    Raises IncompleteCheckpointError naming the missing, unreadable or altered part. Without a
    manifest, array data is only read by `restore`, which reports unreadable data the same way.
    """
    step_dir = epath.Path(self.step_dir(step))
    if not step_dir.is_dir():
      raise IncompleteCheckpointError(str(step_dir), "step directory missing")
    meta_file = step_dir / STEP_METADATA_FILE
    try:
      saved = json.loads(meta_file.read_text())["item_handlers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise IncompleteCheckpointError(
          str(step_dir), f"{STEP_METADATA_FILE} missing or unreadable ({type(e).__name__}: {e}), "
          "so the saved items are unknown") from e
    if not isinstance(saved, dict) or "state" not in saved:
      raise IncompleteCheckpointError(str(step_dir), f"{STEP_METADATA_FILE} lists no 'state' item")
    for name in sorted(saved):
      item_dir = step_dir / name
      if not item_dir.is_dir() or not any(item_dir.iterdir()):
        raise IncompleteCheckpointError(str(step_dir), f"item '{name}' missing or empty")
      if name in PYTREE_ITEMS:
        try:
          tree = json.loads((item_dir / "_METADATA").read_text())["tree_metadata"]
        except (OSError, ValueError, KeyError, TypeError) as e:
          raise IncompleteCheckpointError(
              str(step_dir), f"item '{name}': _METADATA missing or unreadable "
              f"({type(e).__name__}: {e})") from e
        if not tree:
          raise IncompleteCheckpointError(str(step_dir),
                                          f"item '{name}': _METADATA lists no arrays")
    try:
      if not self._verify_checksums(str(step_dir)):
        logging.info("checkpoint %s has no %s: restored without a checksum check", step_dir,
                     checksums.MANIFEST_FILE)
    except checksums.ChecksumError as e:
      raise IncompleteCheckpointError(str(step_dir), str(e)) from e

  @staticmethod
  def _verify_checksums(step_dir: str) -> bool:
    """`checksums.verify_manifest` split over the processes: each hashes its part of the
    files, and every process raises a ChecksumError naming the same file (the first failing
    one in manifest order, re-checked here to say what differs) when any part fails."""
    count = jax.process_count()
    if count == 1:
      return checksums.verify_manifest(step_dir)
    import numpy as np
    from jax.experimental import multihost_utils

    expected = checksums.read_manifest(step_dir)  # every process reads the same manifest
    if expected is None:
      return False
    names = sorted(expected)
    mine = checksums.shard_files(expected, count)[jax.process_index()]
    first_bad = len(names)
    try:
      checksums.check_files(step_dir, expected, mine)
    except checksums.ChecksumError as e:
      first_bad = names.index(e.file)
    found = np.asarray(multihost_utils.process_allgather(np.int32(first_bad)))
    worst = int(found.min())
    if worst < len(names):
      checksums.check_files(step_dir, expected, [names[worst]])  # raises, naming the file
      raise checksums.ChecksumError(f"file {names[worst]} failed its check on another process",
                                    names[worst])
    return True

  def restore(self, step: int, *, abstract_state=None, abstract_ema=None, data_iterator=None,
              with_extras: bool = True) -> dict[str, Any]:
    """Restores the requested items at `step` onto the abstract targets' shardings.

    Transient storage errors are retried (`read_retry`, each retry logged); when they persist,
    StorageReadError names the step, the attempts and the last error. Raises
    IncompleteCheckpointError for a step with missing or unreadable parts (never a partial
    restore) and CheckpointError naming the differences for one that does not fit.
    """
    return self.read_retry.call(
        self._restore_attempt, step, abstract_state=abstract_state, abstract_ema=abstract_ema,
        data_iterator=data_iterator, with_extras=with_extras, what="restoring checkpoint",
        path=self.step_dir(step))

  def _restore_attempt(self, step: int, *, abstract_state, abstract_ema, data_iterator,
                       with_extras: bool) -> dict[str, Any]:
    import grain

    self.verify(step)
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
    except Exception as e:  # pylint: disable=broad-except
      # TensorStore reports unreadable array data (truncated or deleted files) as a plain
      # Exception; every failure is re-raised below as a CheckpointError naming the cause.
      details, readable = [], True
      for name, target in (("state", abstract_state), ("ema", abstract_ema)):
        if target is not None:
          try:
            details += tree_mismatches(os.path.join(self.step_dir(step), name), target, name,
                                       strict=True)
          except (ValueError, OSError) as meta_error:
            readable = False
            details.append(f"{name}: metadata unreadable ({meta_error})")
      # TensorStore's own status (e.g. OUT_OF_RANGE: ...) is the cause.
      cause = storage_retry.describe(e)
      if storage_retry.is_access_failure(e):
        raise CheckpointError(f"cannot read {self.directory}/{step} now ({cause}); not treated "
                              "as damage: retry when storage is reachable") from e
      if not readable or not details:
        # Intact metadata that fits the model: the stored data itself is damaged.
        raise IncompleteCheckpointError(self.step_dir(step), f"unreadable data ({cause})") from e
      hint = "\n  " + "\n  ".join(details[:30])
      raise CheckpointError(f"cannot restore {self.directory}/{step}: {cause}{hint}") from e
    return {k: restored[k] for k in items}

  def restore_newest(self, *, abstract_state=None, abstract_ema=None, data_iterator=None,
                     allow_none_complete: bool = False,
                     set_aside: bool = False) -> tuple[int, dict[str, Any]] | None:
    """Restores the newest complete step: (step, items), or None when there is no step.

    Incomplete or damaged steps (see `verify`; unreadable data found by `restore`) are skipped
    with a warning naming the step and the cause, newest first. A step that is intact but does
    not fit the model raises at once: older steps would not fit either, and so does a storage
    error that says nothing about the step (unreachable, permission denied). When steps exist
    but none is complete: CheckpointError listing each step's cause, or None with
    `allow_none_complete`. `set_aside` renames the skipped steps to '<step>.corrupt' once the
    run goes on without them (so that it can write those steps again).
    """
    if data_iterator is not None:
      start_position = data_iterator.get_state()  # a failed restore may have moved it
    skipped: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        restored = self.restore(step, abstract_state=abstract_state, abstract_ema=abstract_ema,
                                data_iterator=data_iterator)
      except IncompleteCheckpointError as e:
        logging.warning("checkpoint step %d in %s is incomplete or damaged and is skipped: %s",
                        step, self.directory, e.cause)
        skipped.append((step, e.cause))
        if data_iterator is not None:
          data_iterator.set_state(start_position)
        continue
      if skipped:
        logging.warning("resuming from step %d, the newest complete checkpoint in %s (skipped "
                        "steps %s)", step, self.directory, [s for s, _ in skipped])
        if set_aside:
          self.set_aside([s for s, _ in skipped])
      return step, restored
    if not skipped:
      return None
    summary = "; ".join(f"step {s}: {cause}" for s, cause in skipped)
    if not allow_none_complete:
      raise CheckpointError(
          f"{self.directory}: no complete checkpoint ({summary}). Repair or remove these steps, "
          "or set config.checkpoint.allow_fresh_start=True to start again without them")
    logging.warning("no complete checkpoint in %s (%s); starting fresh as "
                    "config.checkpoint.allow_fresh_start=True asks", self.directory, summary)
    if set_aside:
      self.set_aside([s for s, _ in skipped])
    return None

  def set_aside(self, steps: list[int]) -> None:
    """Renames damaged step directories to '<step>.corrupt[.N]' (process 0) and rescans."""
    if jax.process_index() == 0:
      for step in steps:
        source = epath.Path(self.step_dir(step))
        target = epath.Path(self.step_dir(step) + SET_ASIDE_SUFFIX)
        n = 1
        while target.exists():
          target = epath.Path(f"{self.step_dir(step)}{SET_ASIDE_SUFFIX}.{n}")
          n += 1
        source.rename(target)
        logging.warning("moved the damaged checkpoint %s to %s", source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("psvae_checkpoint_set_aside")
    self.manager.reload()


def unfinished_writes(directory: str) -> list[str]:
  """Names of step directories under `directory` whose write never finished."""
  path = epath.Path(directory)
  if not path.is_dir():
    return []
  return sorted(p.name for p in path.iterdir() if UNFINISHED_MARKER in p.name)


def tree_mismatches(item_dir: str, abstract_tree, label: str, *, strict: bool = False) -> list[str]:
  """Human-readable differences between a stored PyTree item and the tree a run expects:
  entries missing from the checkpoint, entries the model does not have, and shape changes.
  Unreadable metadata is reported as one line, or raised (ValueError, OSError) with `strict`."""
  try:
    stored = ocp.StandardCheckpointer().metadata(item_dir).item_metadata
  except (ValueError, OSError) as e:
    if strict:
      raise
    return [f"{label}: metadata unreadable ({e})"]
  if strict and not jax.tree_util.tree_leaves(stored):
    raise ValueError(f"{item_dir}: metadata lists no arrays")
  shapes = {name: tuple(getattr(leaf, "shape", ()) or ())
            for name, leaf in flatten_dotted(stored).items()}
  wanted = {name: tuple(leaf.shape) for name, leaf in flatten_dotted(abstract_tree).items()}
  out = [f"{label}: {name}: checkpoint {shapes[name]} vs model {shape}"
         for name, shape in wanted.items() if name in shapes and shapes[name] != shape]
  out += [f"{label}: missing in checkpoint: {name}" for name in wanted if name not in shapes]
  out += [f"{label}: not in the model: {name}" for name in shapes if name not in wanted]
  return sorted(out, key=lambda line: ("opt_state" in line, line))  # parameters first


def read_config(directory: str, step: int | None = None,
                read_retry: storage_retry.RetryPolicy | None = None) -> dict:
  """The config JSON stored with a checkpoint (latest step by default)."""
  ckpt = Checkpointer(directory, create=False, async_save=False, read_retry=read_retry)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{directory}: no complete checkpoint")
  restored = ckpt.read_retry.call(
      ckpt.manager.restore, step, args=ocp.args.Composite(config=ocp.args.JsonRestore()),
      what="reading the stored config of", path=ckpt.step_dir(step))
  return restored["config"]


def resolve_checkpoint_dir(path: str) -> str:
  """Accepts a run's workdir or its checkpoints/ dir (local or gs://); returns the checkpoints
  dir."""
  trimmed = path.rstrip("/")
  candidate = os.path.join(trimmed, "checkpoints")
  if not _is_gcs(path):
    return candidate if os.path.isdir(candidate) else path
  # A bucket has no directories to look at: a path ending in checkpoints/ is that directory.
  return trimmed if os.path.basename(trimmed) == "checkpoints" else candidate


def restore_tree(path: str, abstract_tree, *, what: str,
                 read_retry: storage_retry.RetryPolicy | None = None):
  """Restores a standalone Orbax PyTree checkpoint (e.g. converted weights) onto shardings.

  The stored tree must match `abstract_tree`'s structure and shapes; mismatches are reported.
  Transient storage errors are retried (`read_retry`, default config.io's defaults).
  """
  checkpointer = ocp.StandardCheckpointer()
  retry = read_retry or storage_retry.RetryPolicy()
  try:
    return retry.call(checkpointer.restore, _abs(path), abstract_tree, what=f"restoring {what}",
                      path=path)
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    raise CheckpointError(f"cannot restore {what} from {path}: {type(e).__name__}: {e}") from e


def log_restore(source: str, step: int) -> None:
  if jax.process_index() == 0:
    logging.info("restored step %d from %s", step, source)
