"""Random-access sources addressed by `config.data.source`, and the train / held-out split.

Spec forms (parse_source):
- 'synthetic:shapes'  the built-in shapes world (image, caption, label, scene);
- 'synthetic:single'  the same world with one object per scene (same fields);
- 'synthetic:edits'   edit pairs of that world (source_image, image = target, instruction,
                      edit_mask, edit_kind, caption, label, scene);
- 'folder:PATH'       images under PATH (recursive; jpg/jpeg/png/webp/bmp) with optional captions
                      from PATH/captions.jsonl ({"file": relpath, "caption": str} per line) or,
                      without that file, per-image sidecar PATH/.../NAME.txt files;
- 'arrayrecord:GLOB'  the project's shards (psvae_jax/data/shards.py);
- 'tfds:NAME[:SPLIT]' a prepared TFDS dataset read through its ArrayRecord files (no TensorFlow
                      graph); NAME may hold a config ('name/config'); SPLIT defaults to 'train'
                      (and 'validation' for eval); features 'image', 'label' and
                      config.data.caption_key are used.

Every source has __len__ and __getitem__(index) -> raw record dict (see preprocess.py) or
BadRecord; sources read bytes and do not decode, so decoding runs in grain's workers.

Reads go through `read_file` (folder images, caption files) and `read_shard_record`
(ArrayRecord shards, latent caches) and retry transient storage errors with the source's
`read_retry` policy (config.io; carried into grain's worker processes with the source). A
record still unreadable after the retries is a BadRecord whose reason says so; a permanent
error (missing file, not an image) is not retried.
"""
import bisect
from concurrent import futures
import dataclasses
import glob
import json
import os

from absl import logging
from grain.experimental import index_shuffle
import grain

from psvae_jax.console import say
from psvae_jax.data import synthetic
from psvae_jax.data.errors import BadRecord, DataError
from psvae_jax.data.shards import decode_record
from psvae_jax.storage_retry import RetryPolicy, StorageReadError

SCHEMES = ("synthetic", "folder", "arrayrecord", "tfds")
SYNTHETIC_KINDS = ("shapes", "single", "edits")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"
MAX_FILE_BYTES = 256 << 20  # an image file larger than this is skipped unread
_HOLDOUT_SEED = 0x5EED  # fixed: the held-out subset never depends on the training seed
_SHARD_OPEN_THREADS = 16  # shards opened (and their records counted) in parallel


class FileTooLarge(ValueError):
  """A file above the size limit, left unread."""


def read_file(path: str, max_bytes: int | None = None) -> bytes:
  """The bytes of one file (what folder sources read images and captions through); raises
  FileTooLarge, unread, when it holds more than `max_bytes`."""
  if max_bytes is not None:
    size = os.path.getsize(path)
    if size > max_bytes:
      raise FileTooLarge(f"file of {size} bytes, above {max_bytes}")
  with open(path, "rb") as f:
    return f.read()


def read_shard_record(shard, index: int) -> bytes:
  """Record `index` of one opened ArrayRecord shard (what ArrayRecord sources read through)."""
  return shard[index]


def _read_failure(error: OSError) -> str:
  """A BadRecord reason for a read that failed; it says when the read was retried."""
  if isinstance(error, StorageReadError):
    return f"unreadable after retrying transient errors: {error}"
  return f"cannot read file: {error}"


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """A parsed data.source string."""
  scheme: str
  arg: str
  split: str | None = None

  def __str__(self):
    return f"{self.scheme}:{self.arg}" + (f":{self.split}" if self.split else "")


def parse_source(spec: str) -> SourceSpec:
  """Parses 'scheme:arg' (see the module docstring); raises DataError naming the problem."""
  if not isinstance(spec, str) or ":" not in spec:
    raise DataError(f"data source {spec!r} is not of the form SCHEME:ARG with SCHEME in {SCHEMES}")
  scheme, arg = spec.split(":", 1)
  if scheme not in SCHEMES:
    raise DataError(f"unknown data source scheme {scheme!r} in {spec!r}; known: {SCHEMES}")
  if not arg:
    raise DataError(f"data source {spec!r} has an empty argument after '{scheme}:'")
  if scheme == "synthetic" and arg not in SYNTHETIC_KINDS:
    raise DataError(f"unknown synthetic world {arg!r} in {spec!r}; known: {SYNTHETIC_KINDS}")
  if scheme == "tfds":
    name, _, split = arg.partition(":")
    if not name:
      raise DataError(f"data source {spec!r} names no TFDS dataset")
    return SourceSpec(scheme, name, split or None)
  return SourceSpec(scheme, arg)


class SyntheticSource:
  """Examples start .. start+length-1 of a synthetic world, rendered at `image_size`."""

  def __init__(self, kind: str, start: int, length: int, image_size: int):
    if kind not in SYNTHETIC_KINDS:
      raise DataError(f"unknown synthetic world {kind!r}; known: {SYNTHETIC_KINDS}")
    if length < 1:
      raise DataError(f"synthetic:{kind} needs a positive length, got {length}")
    self.kind, self.start, self.length, self.image_size = kind, start, length, image_size
    self._make = {"shapes": synthetic.shapes_example, "single": synthetic.single_example,
                  "edits": synthetic.edits_example}[kind]

  def __len__(self):
    return self.length

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.length:
      raise IndexError(f"index {index} outside synthetic:{self.kind} of length {self.length}")
    raw = self._make(self.start + index, self.image_size)
    raw["_id"] = f"synthetic:{self.kind}#{self.start + index}"
    return raw

  def __repr__(self):
    return f"synthetic:{self.kind}[{self.start}:{self.start + self.length}]"


class FolderSource:
  """Image files under a folder, with captions from captions.jsonl or sidecar .txt files."""

  def __init__(self, root: str, read_retry: RetryPolicy | None = None):
    if not os.path.isdir(root):
      raise DataError(f"folder:{root} is not a directory")
    self.root = os.path.abspath(root)
    self.read_retry = read_retry or RetryPolicy()
    files, stems_with_txt = [], set()
    for dirpath, dirnames, names in os.walk(self.root):
      dirnames.sort()
      for name in sorted(names):
        stem, ext = os.path.splitext(name)
        rel = os.path.relpath(os.path.join(dirpath, name), self.root)
        if ext.lower() in IMAGE_EXTENSIONS:
          files.append(rel)
        elif ext.lower() == ".txt":
          stems_with_txt.add(os.path.join(os.path.dirname(rel), stem))
    if not files:
      raise DataError(f"folder:{root} holds no images (extensions {IMAGE_EXTENSIONS})")
    self.files = files
    self.captions = None  # relpath -> caption str (None = unreadable), from captions.jsonl
    self.caption_mode = "none"
    self.caption_problems: list[str] = []
    if os.path.exists(os.path.join(self.root, CAPTIONS_FILE)):
      self.caption_mode = "jsonl"
      self.captions = self._read_captions_file(os.path.join(self.root, CAPTIONS_FILE))
    elif any(os.path.splitext(f)[0] in stems_with_txt for f in files):
      self.caption_mode = "sidecar"

  def _read_captions_file(self, path: str) -> dict:
    captions = {}
    try:
      data = self.read_retry.call(read_file, path, what="reading the captions file", path=path)
    except OSError as e:
      raise DataError(f"folder:{self.root}: cannot read {path}: {e}") from e
    for lineno, line in enumerate(data.split(b"\n"), start=1):
      if not line.strip():
        continue
      try:
        text, utf8_ok = line.decode("utf-8"), True
      except UnicodeDecodeError:
        text, utf8_ok = line.decode("utf-8", errors="replace"), False
      try:
        entry = json.loads(text)
        rel = os.path.normpath(entry["file"])
      except (ValueError, KeyError, TypeError) as e:
        self.caption_problems.append(f"{path}:{lineno}: unparsable line ({type(e).__name__})")
        continue
      caption = entry.get("caption")
      if not utf8_ok or not isinstance(caption, str):
        self.caption_problems.append(f"{path}:{lineno}: caption of {rel} is not UTF-8 text")
        caption = None
      captions[rel] = caption
    if self.caption_problems:
      logging.warning("%s: %d caption problems (these images get the empty caption), e.g. %s",
                      path, len(self.caption_problems), self.caption_problems[:3])
    return captions

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index: int):
    rel = self.files[index]
    path = os.path.join(self.root, rel)
    try:
      image = self.read_retry.call(read_file, path, MAX_FILE_BYTES, what="reading image",
                                   path=path)
    except FileTooLarge as e:
      return BadRecord(path, str(e))
    except OSError as e:
      return BadRecord(path, _read_failure(e))
    raw = {"_id": path, "image": image}
    if self.caption_mode == "jsonl":
      raw["caption"] = self.captions.get(rel)
    elif self.caption_mode == "sidecar":
      caption_path = os.path.splitext(path)[0] + ".txt"
      try:
        raw["caption"] = self.read_retry.call(read_file, caption_path, what="reading caption",
                                              path=caption_path).strip()
      except FileNotFoundError:
        raw["caption"] = None
      except OSError as e:
        return BadRecord(path, f"caption file: {_read_failure(e)}")
    return raw

  def __repr__(self):
    return f"folder:{self.root} ({len(self.files)} images, captions: {self.caption_mode})"


class ArrayRecordSource:
  """Records of the project's shard format from the ArrayRecord files matching a glob.

  Each shard is its own random-access source (opened in parallel), so a failed read names the
  shard file; records are numbered through the shards in path order.
  """

  def __init__(self, pattern: str, read_retry: RetryPolicy | None = None):
    paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
      raise DataError(f"arrayrecord:{pattern} matches no files")
    self.pattern, self.paths = pattern, paths
    self.read_retry = read_retry or RetryPolicy()
    with futures.ThreadPoolExecutor(min(_SHARD_OPEN_THREADS, len(paths))) as pool:
      self._shards = list(pool.map(self._open_shard, paths))
    self._ends = []  # the global index one past each shard's last record
    for shard in self._shards:
      self._ends.append((self._ends[-1] if self._ends else 0) + len(shard))

  def _open_shard(self, path: str):
    try:
      return self.read_retry.call(grain.sources.ArrayRecordDataSource, [path],
                                  what="opening shard", path=path)
    except (OSError, RuntimeError, ValueError) as e:
      raise DataError(f"arrayrecord:{self.pattern}: cannot open the shard {path} ({e})") from e

  def __len__(self):
    return self._ends[-1]

  def __getitem__(self, index: int):
    record_id = f"arrayrecord:{self.pattern}#{index}"
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} outside {record_id.rpartition('#')[0]} of {len(self)} "
                       "records")
    shard = bisect.bisect_right(self._ends, index)
    local = index - (self._ends[shard - 1] if shard else 0)
    path = self.paths[shard]
    try:
      data = self.read_retry.call(read_shard_record, self._shards[shard], local,
                                  what=f"reading record {local} of shard", path=path)
    except StorageReadError as e:
      return BadRecord(record_id, _read_failure(e))
    except (OSError, RuntimeError, ValueError) as e:
      return BadRecord(record_id, f"cannot read record {local} of {path}: {e}")
    try:
      raw = decode_record(data)
    except ValueError as e:
      return BadRecord(record_id, str(e))
    raw["_id"] = record_id
    return raw

  def __repr__(self):
    return f"arrayrecord:{self.pattern} ({len(self.paths)} files, {len(self)} records)"


class TfdsSource:
  """A prepared TFDS dataset split, read through tfds' random-access ArrayRecord data source.

  Image features are read as encoded bytes (decoded by this package, so bad images are skipped
  and counted like any other source).
  """

  def __init__(self, name: str, split: str, data_dir: str = "", caption_key: str = "",
               read_retry: RetryPolicy | None = None):
    self.name, self.split, self.data_dir, self.caption_key = name, split, data_dir, caption_key
    self.read_retry = read_retry or RetryPolicy()
    self._ds = self._open()
    self._length = len(self._ds)

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
    where = self.data_dir or "the default data_dir"
    try:
      builder = tfds.builder(self.name, data_dir=self.data_dir or None)
    except (tfds.core.registered.DatasetNotFoundError, ValueError, OSError) as e:
      raise DataError(f"tfds:{self.name}: cannot find the dataset in {where}: {e}") from e
    if not builder.is_prepared():
      raise DataError(f"tfds:{self.name} is not prepared in {where}; prepare it first "
                      "(e.g. `tfds build`) with file_format=array_record")
    features = builder.info.features
    self.image_keys = [k for k in ("image",) if k in features]
    self.has_label = "label" in features
    if self.caption_key and self.caption_key not in features:
      raise DataError(f"tfds:{self.name} has no feature {self.caption_key!r} (data.caption_key); "
                      f"features: {sorted(features.keys())}")
    splits = list(builder.info.splits.keys())
    if self.split.split("[")[0] not in splits:
      raise DataError(f"tfds:{self.name} has no split {self.split!r}; splits: {splits}. "
                      "Name one as tfds:NAME:SPLIT or set data.eval_source")
    decoders = {k: tfds.decode.SkipDecoding() for k in self.image_keys}
    try:
      return builder.as_data_source(split=self.split, decoders=decoders)
    except (ValueError, NotImplementedError, OSError) as e:
      raise DataError(f"tfds:{self.name}:{self.split}: cannot open as a random-access source "
                      f"(it needs file_format=array_record): {e}") from e

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"] = None  # reopened lazily in each worker process
    return state

  def __len__(self):
    return self._length

  def __getitem__(self, index: int):
    if self._ds is None:
      self._ds = self._open()
    record_id = f"tfds:{self.name}:{self.split}#{index}"
    try:
      ex = self.read_retry.call(self._ds.__getitem__, index, what="reading record",
                                path=record_id)
    except StorageReadError as e:
      return BadRecord(record_id, _read_failure(e))
    except (OSError, RuntimeError, ValueError) as e:
      return BadRecord(record_id, f"cannot read record: {e}")
    raw = {"_id": record_id}
    if self.image_keys:
      raw["image"] = ex["image"]
    if self.has_label:
      raw["label"] = int(ex["label"])
    if self.caption_key:
      raw["caption"] = ex[self.caption_key]
    return raw

  def __repr__(self):
    return f"tfds:{self.name}:{self.split} ({self._length} records)"


class Subset:
  """Positions [start, stop) of a fixed pseudo-random permutation of a source.

  The permutation depends only on the source length, so the train part and the held-out part
  are disjoint and stable across runs, seeds and epochs.
  """

  def __init__(self, source, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop
    self._n = len(source)

  def __len__(self):
    return self.stop - self.start

  def __getitem__(self, index: int):
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} outside a subset of length {len(self)}")
    pos = self.start + index
    return self.source[index_shuffle(pos, max_index=self._n - 1, seed=_HOLDOUT_SEED, rounds=4)]

  def __repr__(self):
    return f"{self.source!r}, subset [{self.start}:{self.stop}] of a fixed permutation"


def open_source(spec: SourceSpec, cfg, *, role: str, read_retry: RetryPolicy | None = None):
  """Opens a whole source; `role` ('train' or 'eval') picks the synthetic range and tfds split;
  `read_retry` is how its reads retry transient storage errors (default: config.io's
  defaults)."""
  if spec.scheme == "synthetic":
    if role == "train":
      return SyntheticSource(spec.arg, 0, cfg.synthetic_size, cfg.image_size)
    return SyntheticSource(spec.arg, cfg.synthetic_size, cfg.eval_size, cfg.image_size)
  if spec.scheme == "folder":
    return FolderSource(spec.arg, read_retry)
  if spec.scheme == "arrayrecord":
    return ArrayRecordSource(spec.arg, read_retry)
  split = spec.split or ("train" if role == "train" else "validation")
  return TfdsSource(spec.arg, split, cfg.tfds_data_dir, cfg.caption_key, read_retry)


# Without data.eval_source, at most this fraction of a folder/arrayrecord source is held out.
MAX_HELD_OUT_FRACTION = 0.1


def held_out_size(eval_size: int, num_records: int) -> int:
  """Records of a source held out for eval: data.eval_size, capped at 10% of the source (at
  least 1), so a small folder keeps most of its images for training."""
  return min(eval_size, max(1, int(num_records * MAX_HELD_OUT_FRACTION)))


def _split_held_out(source, eval_size: int, spec: SourceSpec, *, announce: bool = False):
  n = len(source)
  held = held_out_size(eval_size, n)
  if n - held < 1:
    raise DataError(f"{spec} has {n} record(s): too few to hold {held} out for eval and train "
                    "on the rest; add images or set data.eval_source")
  if announce and held < eval_size:
    say("data: %d of the %d records of %s held out for eval (data.eval_size=%d is capped at "
        "%d%% of the source)", held, n, spec, eval_size, round(100 * MAX_HELD_OUT_FRACTION))
  return Subset(source, held, n), Subset(source, 0, held)


def _holds_out(spec: SourceSpec) -> bool:
  return spec.scheme in ("folder", "arrayrecord")


def train_source(cfg, read_retry: RetryPolicy | None = None):
  """The training source: `data.source`, minus the held-out part when `data.eval_source` is ''."""
  spec = parse_source(cfg.source)
  source = open_source(spec, cfg, role="train", read_retry=read_retry)
  if not cfg.eval_source and _holds_out(spec) and cfg.eval_size > 0:
    return _split_held_out(source, cfg.eval_size, spec, announce=True)[0]
  return source


def eval_source(cfg, read_retry: RetryPolicy | None = None):
  """The held-out source: `data.eval_source` if set, else the held-out part of `data.source`."""
  if cfg.eval_source:
    return open_source(parse_source(cfg.eval_source), cfg, role="eval", read_retry=read_retry)
  spec = parse_source(cfg.source)
  if cfg.eval_size < 1 and spec.scheme != "tfds":
    raise DataError(f"no held-out data for {spec}: data.eval_size is {cfg.eval_size}; "
                    "set data.eval_size > 0 or data.eval_source")
  source = open_source(spec, cfg, role="eval", read_retry=read_retry)
  if _holds_out(spec):
    return _split_held_out(source, cfg.eval_size, spec)[1]
  return source
