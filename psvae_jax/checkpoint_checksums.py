"""SHA-256 manifests of finalized checkpoint steps, so that damaged array data is found.

Orbax's OCDBT format guards its b-tree nodes but not the array chunks: a flipped byte inside a
chunk restores as a silently wrong value. Once a step is finalized, process 0 hashes every file
of the step directory into `<step>/checksums.json` (size and SHA-256 per file, written through a
temporary name and a rename). Before a step is restored its files are hashed again; a missing
file, another size or another digest is damage, reported with the file's name.

With several processes, each hashes its own part of the files (about equal bytes) and the
verdicts are combined (`Checkpointer.verify`), so a restore reads the step's files once more in
all, not once per process.

A step without a manifest (the process died between the finalized save and the manifest, or the
step predates manifests) is restored unchecked, and `verify_manifest` says so to its caller.
Cost: one extra read of the checkpoint after each save and one before each restore. The
Checkpointer hashes a step on process 0 in a background thread started at the next save (the
training loop goes on meanwhile; the save after that waits for it), or at once in wait/close.
"""
from __future__ import annotations

import hashlib
import json

from etils import epath

from psvae_jax.errors import UserError

MANIFEST_FILE = "checksums.json"
_ALGORITHM = "sha256"
_CHUNK_BYTES = 1 << 22


class ChecksumError(UserError, ValueError):
  """A step's files differ from its manifest (or the manifest itself is unreadable); `file` is
  the differing file's name in the manifest (None for the manifest itself)."""

  def __init__(self, message: str, file: str | None = None):
    super().__init__(message)
    self.file = file


def _files(step_dir: epath.Path) -> list[epath.Path]:
  """Every file under `step_dir` except the manifest (and its temporary), sorted."""
  out, pending = [], [step_dir]
  while pending:
    for entry in pending.pop().iterdir():
      if entry.is_dir():
        pending.append(entry)
      elif not entry.name.startswith(MANIFEST_FILE):
        out.append(entry)
  return sorted(out, key=str)


def file_digest(path: epath.Path) -> tuple[int, str]:
  """(size in bytes, hex SHA-256) of one file, read in chunks."""
  digest, size = hashlib.new(_ALGORITHM), 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK_BYTES):
      digest.update(chunk)
      size += len(chunk)
  return size, digest.hexdigest()


def write_manifest(step_dir: str) -> int:
  """Hashes every file of a finalized step into `<step_dir>/checksums.json`; returns the number
  of files."""
  root = epath.Path(step_dir)
  files = {}
  for path in _files(root):
    size, digest = file_digest(path)
    files[str(path.relative_to(root))] = {"size": size, _ALGORITHM: digest}
  temporary = root / (MANIFEST_FILE + ".tmp")
  try:
    temporary.write_text(json.dumps({"algorithm": _ALGORITHM, "files": files}, indent=1))
    temporary.rename(root / MANIFEST_FILE)
  except OSError:
    if temporary.exists():  # a partial write (disk full): the step stays without a manifest
      temporary.unlink()
    raise
  return len(files)


def read_manifest(step_dir: str) -> dict[str, dict] | None:
  """The manifest's file table {relative name: {'size', 'sha256'}}, or None when the step has
  no manifest; raises ChecksumError when it is unreadable."""
  manifest_path = epath.Path(step_dir) / MANIFEST_FILE
  if not manifest_path.exists():
    return None
  try:
    manifest = json.loads(manifest_path.read_text())
    expected = manifest["files"]
    if manifest["algorithm"] != _ALGORITHM or not isinstance(expected, dict):
      raise ValueError(f"unexpected algorithm {manifest['algorithm']!r} or file table")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ChecksumError(f"{MANIFEST_FILE} unreadable ({type(e).__name__}: {e})") from e
  return expected


def shard_files(expected: dict[str, dict], num_shards: int) -> list[list[str]]:
  """Splits the manifest's files over `num_shards` readers with about equal bytes each (largest
  first, each to the least loaded reader); the same split on every process."""
  shards: list[list[str]] = [[] for _ in range(num_shards)]
  loads = [0] * num_shards
  for name in sorted(expected, key=lambda n: (-int(expected[n]["size"]), n)):
    least = loads.index(min(loads))
    shards[least].append(name)
    loads[least] += int(expected[name]["size"])
  return shards


def check_files(step_dir: str, expected: dict[str, dict], names) -> None:
  """Hashes the named files of a step against the manifest's table; raises ChecksumError naming
  the first (in sorted order) that is missing or differs."""
  root = epath.Path(step_dir)
  for name in sorted(names):
    want = expected[name]
    path = root / name
    if not path.exists():
      raise ChecksumError(f"file {name} listed in {MANIFEST_FILE} is missing", name)
    size, digest = file_digest(path)
    if size != want["size"]:
      raise ChecksumError(f"file {name} has {size} bytes, {want['size']} when saved", name)
    if digest != want[_ALGORITHM]:
      raise ChecksumError(f"file {name} changed since the save ({_ALGORITHM} differs)", name)


def verify_manifest(step_dir: str) -> bool:
  """Checks a step's files against its manifest: True when they match, False when the step has
  no manifest; raises ChecksumError naming the first differing file."""
  expected = read_manifest(step_dir)
  if expected is None:
    return False
  check_files(step_dir, expected, expected)
  return True
