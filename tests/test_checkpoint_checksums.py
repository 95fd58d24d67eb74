"""Checksum manifests of checkpoint steps: written once a (async) save is finalized, checked
before a restore; every kind of change to a step's files is named."""
import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import checkpoint_checksums as checksums

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_shards_cover_every_file_once_with_about_equal_bytes():
  expected = {f"f{i}": {"size": size, "sha256": ""}
              for i, size in enumerate([900, 500, 400, 300, 100, 100, 50, 0])}
  shards = checksums.shard_files(expected, 3)
  assert sorted(n for shard in shards for n in shard) == sorted(expected)
  loads = [sum(expected[n]["size"] for n in shard) for shard in shards]
  assert sorted(loads) == [700, 750, 900], loads  # no reader more than the largest file
  assert checksums.shard_files(expected, 3) == shards  # the same split on every process


def test_each_shard_checks_only_its_files(tmp_path):
  directory = _saved(tmp_path, steps=(1,), async_save=False)
  step_dir = os.path.join(directory, "1")
  expected = checksums.read_manifest(step_dir)
  shards = checksums.shard_files(expected, 2)
  damaged = shards[1][0]
  with open(os.path.join(step_dir, damaged), "ab") as f:
    f.write(b"x")
  checksums.check_files(step_dir, expected, shards[0])
  with pytest.raises(checksums.ChecksumError, match=f"{damaged} has") as info:
    checksums.check_files(step_dir, expected, shards[1])
  assert info.value.file == damaged


_TWO_PROCESS_VERIFY = """
import sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import checkpoint_checksums as checksums
hashed = []
check_files = checksums.check_files
def counting(step_dir, expected, names):
  hashed.extend(names)
  return check_files(step_dir, expected, names)
checksums.check_files = counting
reader = ckpt_lib.Checkpointer(sys.argv[3], create=False)
for step in (1, 2):
  hashed.clear()
  try:
    reader.verify(step)
    print(f"step {step}: ok, hashed {sorted(hashed)}")
  except ckpt_lib.IncompleteCheckpointError as e:
    print(f"step {step}: damaged: {e.cause}")
jax.distributed.shutdown()
"""


def test_two_processes_split_the_hashing_and_agree(tmp_path):
  directory = _saved(tmp_path, steps=(1, 2), async_save=False)
  expected = checksums.read_manifest(os.path.join(directory, "2"))
  # An array data file hashed by process 1 only.
  damaged = next(n for n in checksums.shard_files(expected, 2)[1] if "/d/" in n)
  with open(os.path.join(directory, "2", damaged), "ab") as f:
    f.write(b"x")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_VERIFY, address, str(pid),
                             directory], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for pid in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=120)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  assert all(proc.returncode == 0 for proc in procs), "\n".join(outputs)
  hashed = []
  for out in outputs:
    # Both processes reject step 2 and name the same file; only process 1 hashed it.
    assert f"step 2: damaged: file {damaged} has" in out, out
    line = next(l for l in out.splitlines() if l.startswith("step 1: ok"))
    hashed.append(set(ast.literal_eval(line.split("hashed ", 1)[1])))
  assert not hashed[0] & hashed[1]
  assert hashed[0] | hashed[1] == set(checksums.read_manifest(os.path.join(directory, "1")))
