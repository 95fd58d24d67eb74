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

A save that fails (disk full, I/O error, permission lost) raises CheckpointWriteError naming the
step, the directory and the free space there. Async saves fail in Orbax's background thread; the
failure surfaces at the next save, wait or close and is attributed to the step that was being
written. Its unfinished '<step>.orbax-checkpoint-tmp' directory is removed (it is never listed
as a step) and the older steps stay: Orbax deletes the steps retention drops only after the new
step is finalized, and its list of steps is re-read from the directory after a failure.
`on_save_error='retry'` logs the failure as a warning instead and lets the run go on; a save
marked `required` (the last one of a run, the one on SIGTERM) raises whatever the setting.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
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
ON_SAVE_ERROR = ("stop", "retry")
# Bound on the pending background writes of one failed save that are waited for, one by one.
_MAX_PENDING_WRITES = 16


class CheckpointError(UserError, RuntimeError):
  """A checkpoint could not be restored; the message names the directory and the cause."""


class IncompleteCheckpointError(CheckpointError):
  """A step directory is incomplete or damaged: an item or file is missing or unreadable."""

  def __init__(self, step_dir: str, cause: str):
    super().__init__(f"{step_dir}: incomplete or damaged checkpoint: {cause}")
    self.step_dir, self.cause = step_dir, cause


class CheckpointWriteError(CheckpointError):
  """Saving a step failed (disk full, I/O error, permission lost): names the step, the directory,
  the cause, the free space there and the newest complete step, which is left intact."""

  def __init__(self, step: int, directory: str, cause: BaseException, newest: int | None,
               space: str, what: str = "could not be saved"):
    """`space`: `free_space(directory)` when the save failed (before its partial write is
    removed)."""
    newest_text = (f"the newest complete step is {newest}" if newest is not None
                   else "no complete step is left")
    super().__init__(f"checkpoint step {step} {what} to {directory}: "
                     f"{storage_retry.describe(cause)} ({space}); {newest_text}")
    self.step, self.directory = step, directory


def free_space(directory: str) -> str:
  """Free and total space of the filesystem holding `directory`, in words."""
  if _is_gcs(directory):
    return "free space unknown: gs:// is object storage, with no filesystem to ask"
  path = os.path.abspath(directory)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    usage = shutil.disk_usage(path)
  except OSError as e:
    return f"free space unknown: {path}: {e}"
  return f"{_bytes(usage.free)} free of {_bytes(usage.total)} on the filesystem of {path}"


def _bytes(n: float) -> str:
  units = ("B", "KiB", "MiB", "GiB", "TiB")
  i = 0
  while n >= 1024 and i < len(units) - 1:
    n, i = n / 1024, i + 1
  return f"{int(n)} B" if i == 0 else f"{n:.1f} {units[i]}"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def _is_gcs(path: str) -> bool:
  return path.startswith("gs://")


def _abs(path: str) -> str:
  return path if _is_gcs(path) else os.path.abspath(path)


_ORBAX_CONFIGURED = False
# Orbax logs a failed save at ERROR with tracebacks from its background threads (and asyncio
# logs the failed writes of its other write tasks when they are collected, possibly after the
# run's last line); the Checkpointer reports the same failure as one line (CheckpointWriteError).
# These records are demoted to INFO: kept in the log file, off the console.
_ORBAX_SAVE_FAILURE_LOGS = ("Handler Commit operations", "Save Finalize thread",
                            "Checkpointer failed", "raised an exception",
                            "Failed to write metadata")
_ORBAX_PATH = f"{os.sep}orbax{os.sep}"


# The warning Orbax gives when a type handler is replaced: the CPU one below, on purpose.
_ORBAX_HANDLER_OVERRIDE_LOG = 'Type handler registry type "%s" overriding'


class _OrbaxSaveFailuresToLogFile(logging.Filter):
  """Demotes the ERROR records of a failed Orbax save to INFO (see _ORBAX_SAVE_FAILURE_LOGS), and
  the warning of the project's own type-handler override."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = str(record.msg)
    if text.startswith(_ORBAX_HANDLER_OVERRIDE_LOG) and _ORBAX_PATH in record.pathname:
      record.levelno, record.levelname = logging.INFO, "INFO"
      return True
    if record.levelno >= logging.ERROR and (
        (_ORBAX_PATH in record.pathname and any(t in text for t in _ORBAX_SAVE_FAILURE_LOGS))
        or (record.name == "asyncio" and "exception was never retrieved" in text
            and (_ORBAX_PATH in text or UNFINISHED_MARKER in text))):
      record.levelno, record.levelname = logging.INFO, "INFO"
    return True


_SAVE_FAILURE_FILTER = _OrbaxSaveFailuresToLogFile()


def _configure_orbax() -> None:
  """Once per process: Orbax's save-failure records off the console (see
  _ORBAX_SAVE_FAILURE_LOGS), and on CPU, replicated arrays written from one replica (the
  handler override's warning goes to the log file).

  Orbax's replica-parallel writes slice every replicated array per device with a jitted slice
  per (shape, device): on simulated CPU devices those compiles cost far more than the write.
  Accelerators keep the default (parallel writes across replicas).
  """
  global _ORBAX_CONFIGURED
  if _ORBAX_CONFIGURED:
    return
  _ORBAX_CONFIGURED = True
  for logger in ("absl", "asyncio"):  # Orbax logs through absl
    logging.getLogger(logger).addFilter(_SAVE_FAILURE_FILTER)
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
  """The run's CheckpointManager with the project's items and retention policy."""

  def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0,
               async_save: bool = True, create: bool = True, checksums: bool = True,
               on_save_error: str = "stop",
               read_retry: storage_retry.RetryPolicy | None = None):
    """`create=False` opens another run's checkpoints for reading: nothing there is removed.
    `checksums`: write a SHA-256 manifest into each step once it is finalized (steps that have
    one are always checked before a restore). `on_save_error`: 'stop' raises a failed save's
    CheckpointWriteError, 'retry' logs it as a warning (see the module docstring).
    `read_retry`: how restores retry transient storage errors (default: config.io's defaults)."""
    if on_save_error not in ON_SAVE_ERROR:
      raise ValueError(f"on_save_error={on_save_error!r}: expected one of {ON_SAVE_ERROR}")
    _configure_orbax()
    self.directory = _abs(directory)
    self.checksums = checksums
    self.on_save_error = on_save_error
    self.read_retry = read_retry or storage_retry.RetryPolicy()
    self.failed_saves: list[int] = []  # steps whose save failed under on_save_error='retry'
    # The save not yet waited for: (step, required). Its failure is attributed to that step.
    self._in_flight: tuple[int, bool] | None = None
    self._steps_without_manifest: list[int] = []
    # Process 0 hashes finalized steps in this thread while training goes on (see
    # _write_manifests); its failure is raised at the next save, wait or close.
    self._hashing: threading.Thread | None = None
    self._hashing_error: tuple[int, Exception] | None = None
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
        # The step's directory is created (and its first metadata written) before save()
        # returns, not in a background thread: a save that fails as it starts then leaves no
        # write behind that could fail later and be taken for the next save's failure.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
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
           extras: dict | None = None, force: bool = False, required: bool = False) -> bool:
    """Starts an (async) save of all items at `step`; returns whether a save was started.

    First waits for the previous save: its failure is reported here (CheckpointWriteError
    naming that step, or a warning under on_save_error='retry'), and this save starts anyway
    when it is only a warning. `required`: this save's failure raises whatever on_save_error
    says (nothing later would save the state).
    """
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
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-except  (only storage errors are handled)
      self._save_failed(step, e, required)
      return False
    if saved:
      self._in_flight = (step, required)
      if self.checksums:
        self._steps_without_manifest.append(step)
    return saved

  def require(self, step: int) -> None:
    """Makes the save of `step`, if still in flight, one whose failure raises whatever
    on_save_error says (as `save(..., required=True)`): a SIGTERM arrived after it started."""
    if self._in_flight is not None and self._in_flight[0] == step:
      self._in_flight = (step, True)

  def wait(self) -> None:
    """Waits for the running save and writes the manifests of every finalized step; a failure
    of that save is reported as in `save`."""
    self._write_manifests(background=False)

  def close(self) -> None:
    try:
      self._write_manifests(background=False)
    finally:
      self.manager.close()

  def _wait_for_save(self) -> None:
    """Waits for the save in flight; its failure goes to `_save_failed`, naming its step."""
    in_flight, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (only storage errors are handled)
      if in_flight is None:
        raise
      self._save_failed(in_flight[0], e, required=in_flight[1])

  def _save_failed(self, step: int, error: Exception, required: bool) -> None:
    """After the save of `step` failed: removes its unfinished directory, re-reads the steps
    from the directory (Orbax dropped the ones retention would remove once this step was
    committed; they are still there), then raises CheckpointWriteError, or logs it as a
    warning under on_save_error='retry' unless `required`. A non-storage error (a bug) is
    re-raised as it is."""
    if step in self._steps_without_manifest:
      self._steps_without_manifest.remove(step)
    self._settle_failed_save(step)
    space = free_space(self.directory)
    self._remove_unfinished(step)
    self.manager.reload()
    if not storage_retry.is_storage_error(error):
      raise error
    self._report(CheckpointWriteError(step, self.directory, error, self.latest_step(), space),
                 error, required)

  def _report(self, failure: CheckpointWriteError, cause: Exception, required: bool) -> None:
    if required or self.on_save_error == "stop":
      raise failure from cause
    self.failed_saves.append(failure.step)
    logging.warning("%s; training goes on and the next save tries again "
                    "(config.checkpoint.on_save_error='retry')", failure)

  def _settle_failed_save(self, step: int) -> None:
    """Waits for the background writes a failed save had started (Orbax's step metadata, which
    it writes apart from the arrays). Their errors are part of the failure being reported:
    left pending, the next Orbax call (a restore of an older step) would raise them, and the
    older step would look damaged."""
    for _ in range(_MAX_PENDING_WRITES):
      try:
        self.manager.check_for_errors()
        return
      except Exception as e:  # pylint: disable=broad-except  (the failure is already reported)
        logging.info("checkpoint step %d: a background write of its failed save failed too: %s",
                      step, storage_retry.describe(e))

  def _remove_unfinished(self, step: int) -> None:
    """Process 0 removes the unfinished '<step>.orbax-checkpoint-tmp*' directory of a failed
    save (freeing what it took); one it cannot remove is removed at the next start."""
    if jax.process_index() != 0 or _is_gcs(self.directory):
      return
    for name in unfinished_writes(self.directory):
      if name.split(".", 1)[0] != str(step):
        continue
      try:
        epath.Path(self.directory, name).rmtree()
      except OSError as e:
        logging.warning("could not remove the unfinished checkpoint %s/%s (%s); it is removed "
                        "when the run starts again", self.directory, name, e)

  def _write_manifests(self, *, background: bool) -> None:
    """Waits for the running save and for the hashing thread, then (process 0) hashes the steps
    saved since the last call that retention has not removed: in a new thread when
    `background`, else here."""
    self._wait_for_save()
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
          self._hashing_error = (step, e)
          return
        # Retention removed the step while it was hashed: nothing left to guard.
        logging.info("checkpoint %s was removed before its manifest was written", step_dir)
      except (OSError, ValueError) as e:
        self._hashing_error = (step, e)
        return

  def _join_hashing(self) -> None:
    """Waits for the hashing thread. A manifest that could not be written (the step itself is
    complete and restores unchecked) is a save failure of its step, reported as in `save`."""
    if self._hashing is not None:
      self._hashing.join()
      self._hashing = None
    if self._hashing_error is not None:
      (step, error), self._hashing_error = self._hashing_error, None
      if not isinstance(error, OSError):
        raise CheckpointError(f"writing a checksum manifest under {self.directory} failed: "
                              f"{type(error).__name__}: {error}") from error
      failure = CheckpointWriteError(
          step, self.directory, error, self.latest_step(), free_space(self.directory),
          what=f"was saved but its checksum manifest ({checksums.MANIFEST_FILE}) could not be "
          "written")
      self._report(failure, error, required=False)

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
