"""Checksum manifests of checkpoint steps: written once a (async) save is finalized, checked
before a restore; every kind of change to a step's files is named."""
import json
import os
import shutil
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import checkpoint_checksums as checksums


def _state(value: float) -> dict:
  return {"w": jnp.full((64,), value, jnp.float32), "b": jnp.arange(8, dtype=jnp.float32)}


def _saved(tmp_path, steps=(1, 2), **kwargs) -> str:
  directory = str(tmp_path / "ckpt")
  ckpt = ckpt_lib.Checkpointer(directory, **kwargs)
  for step in steps:
    ckpt.save(step, state=_state(float(step)), extras={"step": step})
  ckpt.close()
  return directory


def test_async_saves_get_manifests_that_list_every_file(tmp_path):
  directory = _saved(tmp_path, steps=(1, 2, 3), keep=2, async_save=True)
  assert sorted(os.listdir(directory)) == ["2", "3"]  # retention removed step 1 before hashing
  for step in ("2", "3"):
    step_dir = os.path.join(directory, step)
    manifest = json.load(open(os.path.join(step_dir, checksums.MANIFEST_FILE)))
    on_disk = {os.path.relpath(os.path.join(root, f), step_dir)
               for root, _, files in os.walk(step_dir) for f in files}
    assert set(manifest["files"]) == on_disk - {checksums.MANIFEST_FILE}
    assert any(name.startswith("state/") for name in manifest["files"])
    assert checksums.verify_manifest(step_dir)


def test_every_change_is_named(tmp_path):
  directory = _saved(tmp_path, steps=(1,), async_save=False)
  step_dir = os.path.join(directory, "1")
  manifest = json.load(open(os.path.join(step_dir, checksums.MANIFEST_FILE)))
  name = max(manifest["files"], key=lambda n: manifest["files"][n]["size"])
  path = os.path.join(step_dir, name)
  original = open(path, "rb").read()

  with open(path, "ab") as f:
    f.write(b"x")
  with pytest.raises(checksums.ChecksumError, match=f"{name} has .* bytes"):
    checksums.verify_manifest(step_dir)
  with open(path, "wb") as f:
    f.write(bytes([original[0] ^ 1]) + original[1:])
  with pytest.raises(checksums.ChecksumError, match=f"{name} changed since the save"):
    checksums.verify_manifest(step_dir)
  os.remove(path)
  with pytest.raises(checksums.ChecksumError, match=f"{name} listed in .* is missing"):
    checksums.verify_manifest(step_dir)
  with open(path, "wb") as f:
    f.write(original)
  assert checksums.verify_manifest(step_dir)
  # Through the Checkpointer: damage is an IncompleteCheckpointError naming the file.
  with open(os.path.join(step_dir, checksums.MANIFEST_FILE), "w") as f:
    f.write("{not json")
  with pytest.raises(ckpt_lib.IncompleteCheckpointError, match="checksums.json unreadable"):
    ckpt_lib.Checkpointer(directory, create=False).verify(1)


def test_steps_without_manifest_restore_unchecked(tmp_path):
  directory = _saved(tmp_path, steps=(1,), async_save=False, checksums=False)
  step_dir = os.path.join(directory, "1")
  assert not os.path.exists(os.path.join(step_dir, checksums.MANIFEST_FILE))
  assert checksums.verify_manifest(step_dir) is False
  reader = ckpt_lib.Checkpointer(directory, create=False)
  restored = reader.restore(1, abstract_state=_state(0.0))
  np.testing.assert_array_equal(restored["state"]["w"], np.full(64, 1.0, np.float32))


def test_manifests_are_hashed_while_training_goes_on(tmp_path, monkeypatch):
  hashing, release = threading.Event(), threading.Event()
  write = checksums.write_manifest

  def slow_write(step_dir):
    hashing.set()
    assert release.wait(30)
    return write(step_dir)

  monkeypatch.setattr(checksums, "write_manifest", slow_write)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(1, state=_state(1.0))
  ckpt.save(2, state=_state(2.0))  # returns while step 1 is being hashed
  assert hashing.wait(30)
  step_1 = os.path.join(ckpt.directory, "1")
  assert not os.path.exists(os.path.join(step_1, checksums.MANIFEST_FILE))
  release.set()
  ckpt.wait()  # joins the thread and hashes step 2 itself
  for step in ("1", "2"):
    assert checksums.verify_manifest(os.path.join(ckpt.directory, step))
  ckpt.close()


def test_a_failed_background_manifest_is_raised_at_the_next_call(tmp_path, monkeypatch):
  def failing_write(step_dir):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(checksums, "write_manifest", failing_write)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(1, state=_state(1.0))
  ckpt.save(2, state=_state(2.0))
  with pytest.raises(ckpt_lib.CheckpointError, match="checksum manifest .* No space left"):
    ckpt.wait()
  monkeypatch.setattr(checksums, "write_manifest", lambda step_dir: 0)
  ckpt.close()  # the error was reported once; nothing else is pending


def test_a_step_removed_by_retention_while_hashed_is_skipped(tmp_path, monkeypatch):
  def removed_meanwhile(step_dir):
    shutil.rmtree(step_dir)
    raise FileNotFoundError(step_dir)

  monkeypatch.setattr(checksums, "write_manifest", removed_meanwhile)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(1, state=_state(1.0))
  ckpt.wait()  # no error: the step is gone, nothing is left to guard
  ckpt.close()
