"""A fault-injecting file layer: the first k reads of chosen paths fail with a transient error.

It wraps the functions the code reads through: `sources.read_file` (folder images, caption
files), `sources.read_shard_record` (ArrayRecord shards, latent caches), Orbax's
`CheckpointManager.restore` (checkpoint steps, read through TensorStore) and etils'
`Path.read_text` (a checkpoint's metadata files, read before a restore). Files fail as a flaky
disk or network filesystem does (OSError EIO), checkpoint steps as TensorStore reports an
unreachable bucket (UNAVAILABLE). Works in the test's process (grain read threads included),
not in grain worker processes.
"""
from __future__ import annotations

import collections
import errno
import os
import threading

import orbax.checkpoint as ocp
from etils import epath

from psvae_jax.data import sources


def io_error(path: str) -> OSError:
  return OSError(errno.EIO, os.strerror(errno.EIO), path)


def unavailable(path: str) -> ValueError:
  return ValueError(f"UNAVAILABLE: Error reading {path}: connection reset by peer")


class FlakyReads:
  """`fail(suffix, times)`: the first `times` reads of each path ending with `suffix` fail.

  `failures[path]` counts the reads that failed, `reads[path]` all reads of matching paths.
  """

  def __init__(self, monkeypatch):
    self._rules: list[tuple[str, int]] = []  # (path suffix, reads that fail)
    self.failures: collections.Counter = collections.Counter()
    self.reads: collections.Counter = collections.Counter()
    self._lock = threading.Lock()
    monkeypatch.setattr(sources, "read_file", self._wrap(
        sources.read_file, lambda path, *args, **kwargs: path, io_error))
    monkeypatch.setattr(sources, "read_shard_record", self._wrap(
        sources.read_shard_record, lambda shard, index: os.fspath(shard.paths[0]), io_error))
    monkeypatch.setattr(ocp.CheckpointManager, "restore", self._wrap(
        ocp.CheckpointManager.restore,
        lambda manager, step, *args, **kwargs: f"{manager.directory}/{step}", unavailable))
    local_path = type(epath.Path("/"))
    monkeypatch.setattr(local_path, "read_text", self._wrap(
        local_path.read_text, lambda path, *args, **kwargs: os.fspath(path), io_error))

  def fail(self, suffix: str, times: int) -> None:
    self._rules.append((suffix, times))

  def _should_fail(self, path: str) -> bool:
    with self._lock:
      for suffix, times in self._rules:
        if path.endswith(suffix):
          self.reads[path] += 1
          if self.failures[path] < times:
            self.failures[path] += 1
            return True
          return False
      return False

  def _wrap(self, read, path_of, make_error):
    def flaky(*args, **kwargs):
      path = path_of(*args, **kwargs)
      if self._should_fail(path):
        raise make_error(path)
      return read(*args, **kwargs)
    return flaky
