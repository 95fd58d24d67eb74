"""The project's shard format: ArrayRecord files of msgpack-encoded example dicts.

Record format (version 1), one ArrayRecord record per example:
- a msgpack map with string keys; key "$v" holds the format version (1);
- values: str (UTF-8), bytes (e.g. an encoded JPEG/PNG), int, float, bool, None, or a numpy array
  stored as msgpack extension type 1 whose payload is msgpack [dtype name, shape, little-endian
  raw bytes] (dtypes: bool, (u)int8-64, float16/32/64, bfloat16);
- conventional keys: 'image' (encoded bytes, or a uint8 (H, W, 3) array), 'caption' (str),
  'label' (int), 'source_image' and 'instruction' (edit pairs), 'edit_mask' (bool (H, W) array),
  and any arrays a later stage caches (e.g. 'latent').
Nothing is ever unpickled. Shards are written as `{prefix}-{index:05d}.array_record` and renamed
into place only when complete, so a crashed writer never leaves a partial shard that a glob finds.
"""
import os

import ml_dtypes
import msgpack
import numpy as np

FORMAT_VERSION = 1
_EXT_NDARRAY = 1
_ALLOWED_DTYPES = {
    name: np.dtype(name) for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64")
}
_ALLOWED_DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)


def _dtype_name(dtype: np.dtype) -> str:
  for name, allowed in _ALLOWED_DTYPES.items():
    if dtype == allowed or (dtype.kind != "V" and dtype.newbyteorder("<") == allowed):
      return name
  raise TypeError(f"arrays of dtype {dtype} cannot be stored; allowed: {sorted(_ALLOWED_DTYPES)}")


def _default(value):
  if isinstance(value, np.ndarray):
    name = _dtype_name(value.dtype)
    data = np.ascontiguousarray(value.astype(_ALLOWED_DTYPES[name].newbyteorder("<")
                                             if name != "bfloat16" else value.dtype)).tobytes()
    return msgpack.ExtType(_EXT_NDARRAY, msgpack.packb([name, list(value.shape), data]))
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"cannot store a value of type {type(value).__name__} in a record")


def _ext_hook(code: int, payload: bytes):
  if code != _EXT_NDARRAY:
    raise ValueError(f"unknown msgpack extension type {code} in record")
  name, shape, data = msgpack.unpackb(payload, raw=False)
  if name not in _ALLOWED_DTYPES:
    raise ValueError(f"record array has unsupported dtype {name!r}")
  dtype = _ALLOWED_DTYPES[name]
  if name != "bfloat16":
    dtype = dtype.newbyteorder("<")
  arr = np.frombuffer(data, dtype=dtype)
  if arr.size != int(np.prod(shape, dtype=np.int64)):
    raise ValueError(f"record array of shape {shape} has {arr.size} elements")
  return arr.reshape(shape).astype(_ALLOWED_DTYPES[name], copy=False)


def encode_record(example: dict) -> bytes:
  """Serialises an example dict (see the module docstring for what values may hold)."""
  if not isinstance(example, dict):
    raise TypeError(f"a record must be a dict, got {type(example).__name__}")
  for key in example:
    if not isinstance(key, str) or key.startswith("$"):
      raise ValueError(f"record keys must be str not starting with '$', got {key!r}")
  return msgpack.packb({"$v": FORMAT_VERSION, **example}, default=_default, use_bin_type=True)


def decode_record(data: bytes) -> dict:
  """Parses a record written by encode_record; raises ValueError on anything else."""
  try:
    out = msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=True)
  except (msgpack.UnpackException, ValueError, TypeError, UnicodeDecodeError) as e:
    raise ValueError(f"not a valid record: {type(e).__name__}: {e}") from None
  if not isinstance(out, dict) or out.get("$v") != FORMAT_VERSION:
    raise ValueError(f"not a version-{FORMAT_VERSION} record (missing or different '$v')")
  del out["$v"]
  return out


class ShardWriter:
  """Writes example dicts to `{out_dir}/{prefix}-{index:05d}.array_record` shards.

  Usage: `with ShardWriter(dir, 'train', 1000) as w: w.write({'image': jpeg_bytes, 'caption': s})`.
  Each shard is written under a temporary name and renamed when full or on close().
  """

  def __init__(self, out_dir: str, prefix: str, records_per_shard: int = 1000):
    if records_per_shard < 1:
      raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    if not prefix or "/" in prefix:
      raise ValueError(f"prefix must be a plain file name prefix, got {prefix!r}")
    self.out_dir, self.prefix, self.records_per_shard = out_dir, prefix, records_per_shard
    os.makedirs(out_dir, exist_ok=True)
    self.paths: list[str] = []
    self.num_written = 0
    self._writer = None
    self._tmp_path = None
    self._in_shard = 0

  def _open_shard(self):
    # Imported here so reading shards through grain does not need the writer module loaded.
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    path = os.path.join(self.out_dir, f"{self.prefix}-{len(self.paths):05d}.array_record")
    self._tmp_path = path + ".tmp"
    # group_size:1 keeps every record individually addressable for fast random access.
    self._writer = array_record_module.ArrayRecordWriter(self._tmp_path, "group_size:1")
    self.paths.append(path)
    self._in_shard = 0

  def _close_shard(self):
    if self._writer is not None:
      self._writer.close()
      os.replace(self._tmp_path, self.paths[-1])
      self._writer = None

  def write(self, example: dict) -> None:
    """Appends one example (a dict of str/bytes/numbers/numpy arrays)."""
    data = encode_record(example)
    if self._writer is None:
      self._open_shard()
    self._writer.write(data)
    self._in_shard += 1
    self.num_written += 1
    if self._in_shard >= self.records_per_shard:
      self._close_shard()

  def close(self) -> list[str]:
    """Finishes the last shard; returns the paths of all shards written."""
    self._close_shard()
    return list(self.paths)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
