"""Converts image corpora into the project's ArrayRecord shards (psvae_jax/data/shards.py).

  python -m psvae_jax.tools.prepare --input=INPUT --format=FORMAT --out=DIR [--prefix=train] \
      [--records_per_shard=1000] [--image_size=S --jpeg_quality=95] [--max_records=N] \
      [--threads=T] [--overwrite]

Formats (INPUT):
  webdataset        tar shards (a glob, or a directory searched for *.tar) as img2dataset writes
                    them: members KEY.jpg|jpeg|png|webp|bmp plus KEY.txt and/or KEY.json (caption
                    in the json's 'caption' or 'text', see --caption_keys; .txt wins when both
                    exist). Tars are streamed member by member, never extracted.
  folder            an image folder (recursive) with optional captions.jsonl ({"file", "caption"}
                    per line) or sidecar NAME.txt files, read exactly as the 'folder:' data
                    source reads it. Without any captions the records hold images only.
  edit_jsonl        a JSONL (or a glob of them) of {"source": path, "target": path,
                    "instruction": str[, "task": str]}; relative paths are taken from the
                    JSONL's directory.
  omniedit_parquet  parquet files (a glob, or a directory searched for *.parquet) in the layout
                    of the OmniEdit-Filtered-1.2M dataset card: columns
                      src_img, edited_img   image structs {'bytes': binary, 'path': string}
                                            (Hugging Face `Image` feature; plain binary accepted)
                      edited_prompt_list    list<string> of instructions (a plain string accepted)
                      task                  string, the edit type (kept as 'edit_kind')
                      omni_edit_id          string, used only to name records in the summary
                      o_score               float64, overall quality score (see --min_score)
                    (width, height, sc_*, pq_* are not read). Every name is a flag.

Records written (the field names the training pipeline reads):
  image-caption formats: {'image': encoded bytes, 'caption': str} ('caption' absent for a
                         folder without captions; None for kept uncaptioned records);
  edit formats:          {'image': target bytes, 'source_image': source bytes,
                          'instruction': str, 'edit_kind': str ('' when unknown)}.
Images are checked by fully decoding them (data.decode, with --max_image_pixels and
--min_image_size bounds). Without --image_size the original encoded bytes are stored unchanged;
with it, images whose shorter side is above S are resized (antialiased bicubic) to shorter side
S and stored as JPEG (--jpeg_quality); smaller images keep their bytes (no upscaling, no second
lossy encode).
The two images of an edit pair must have the same size (the pipeline requires it).

Unusable inputs (undecodable or missing image, missing caption or instruction, non-UTF-8 text,
unparsable lines, source/target size mismatch, broken tars) are skipped and counted by kind; a
summary (counts, examples with reasons, shards written, the data.source spec to train on) goes to
DIR/prepare_summary.json (DIR/prepare_summary-PREFIX.json for another --prefix) and stdout.
Decoding runs on a thread pool; the output order is the input order whatever the thread count
(sorted files, then members / lines / rows in file order).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import glob
import io
import json
import os
import re
import tarfile
import time
import zlib
from concurrent import futures
from typing import Callable, Iterable, Iterator

from absl import app, flags, logging
import numpy as np
from PIL import Image

from psvae_jax.data.decode import encode_image, load_rgb
from psvae_jax.data.errors import BadImage, BadRecord, DataError
from psvae_jax.data.shards import ShardWriter
from psvae_jax.data.sources import MAX_FILE_BYTES, FolderSource
from psvae_jax.tools import cli

FORMATS = ("webdataset", "folder", "edit_jsonl", "omniedit_parquet")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")  # preference order within a key
MAX_TEXT_BYTES = 1 << 20  # a caption / metadata member larger than this is not read
MAX_SKIP_EXAMPLES = 50
_TAR_MEMBER = re.compile(r"^((?:.*/)?[^./][^./]*)\.([^/]+)$")  # KEY.EXT, KEY up to the first dot


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """How inputs become records (every field is a command-line flag of the same name)."""
  image_size: int = 0  # 0: keep the encoded bytes; S: shorter side above S -> resized to S, JPEG
  jpeg_quality: int = 95
  max_image_pixels: int = 8192 * 8192
  min_image_size: int = 32
  keep_uncaptioned: bool = False  # True: write caption None (the pipeline counts a fallback)
  caption_keys: tuple[str, ...] = ("caption", "text")  # webdataset .json keys, in order
  source_column: str = "src_img"
  target_column: str = "edited_img"
  instruction_column: str = "edited_prompt_list"
  task_column: str = "task"  # '' = none
  id_column: str = "omni_edit_id"  # '' = none; names records in the summary only
  instructions: str = "first"  # list-valued instruction column: 'first' or 'all' (a record each)
  score_column: str = "o_score"
  min_score: float | None = None  # rows whose score_column is below this are filtered out


class Skip(Exception):
  """An input that cannot become a record; `kind` is a short category counted in the summary."""

  def __init__(self, kind: str, reason: str):
    super().__init__(f"{kind}: {reason}")
    self.kind, self.reason = kind, reason


@dataclasses.dataclass
class Unit:
  """One input (a tar key, an image file, a JSONL line, a parquet row).

  `make` runs on the thread pool and returns the records (usually one) or raises Skip; `skip`
  is set instead when the reader already knows the input is unusable.
  """
  record_id: str
  make: Callable[[], list[dict]] | None = None
  skip: Skip | None = None


# ---------------------------------------------------------------------------------------------
# Images and texts


def _check_size(data: bytes) -> bytes:
  if len(data) > MAX_FILE_BYTES:
    raise Skip("too_large", f"{len(data)} bytes, above {MAX_FILE_BYTES}")
  return data


def _image(data, opts: PrepareOptions, *, draft: bool) -> tuple[bytes, tuple[int, int]]:
  """Validates (decodes) one encoded image and applies --image_size.

  Returns (bytes to store, (W, H) of the decoded, EXIF-oriented image before any resize);
  the size is exact only with draft=False (JPEG draft decoding may reduce it).
  """
  if data is None:
    raise Skip("missing_image", "no image")
  data = _check_size(bytes(data))
  size = opts.image_size
  try:
    im = load_rgb(data, max_pixels=opts.max_image_pixels, min_size=opts.min_image_size,
                  draft_short_side=size if (draft and size) else None)
    # The header size (cheap, already parsed once) decides on resizing; the shorter side does
    # not change under EXIF rotation.
    header_short = min(Image.open(io.BytesIO(data)).size)
  except BadImage as e:
    raise Skip("bad_image", str(e)) from None
  if not size or header_short <= size:
    return data, im.size
  w, h = im.size
  scale = size / min(w, h)
  new = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
  resized = im.resize(new, Image.BICUBIC, reducing_gap=3.0)  # antialiased, as the pipeline
  return encode_image(np.asarray(resized), format="jpeg", quality=opts.jpeg_quality), im.size


def _text(value, what: str) -> str:
  """A non-empty UTF-8 text or Skip('missing_<what>' / 'bad_text')."""
  if isinstance(value, (bytes, bytearray, memoryview)):
    try:
      value = bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      raise Skip("bad_text", f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None
  if value is None:
    raise Skip(f"missing_{what}", f"no {what}")
  if not isinstance(value, str):
    raise Skip("bad_text", f"{what} is a {type(value).__name__}, not text")
  value = value.strip()
  if not value:
    raise Skip(f"missing_{what}", f"empty {what}")
  return value


def _caption_record(image: bytes, caption, opts: PrepareOptions, *, captioned: bool = True):
  """An image-caption record; `caption` is a str / bytes / None or a callable giving one."""
  stored, _ = _image(image, opts, draft=True)
  if not captioned:
    return [{"image": stored}]
  try:
    text = _text(caption() if callable(caption) else caption, "caption")
  except Skip:
    if not opts.keep_uncaptioned:
      raise
    text = None
  return [{"image": stored, "caption": text}]


def _edit_records(source: bytes, target: bytes, instructions: list, task, opts: PrepareOptions):
  """Edit-triplet records (one per instruction) sharing the two validated images."""
  texts = [_text(v, "instruction") for v in instructions]
  if not texts:
    raise Skip("missing_instruction", "no instruction")
  src, src_size = _image(source, opts, draft=False)
  tgt, tgt_size = _image(target, opts, draft=False)
  if src_size != tgt_size:
    raise Skip("size_mismatch", f"source image is {src_size[0]}x{src_size[1]}, target "
               f"{tgt_size[0]}x{tgt_size[1]}; the pipeline needs equal sizes")
  kind = ""  # the edit type is optional; when given it must be text
  if task is not None and not (isinstance(task, str) and not task.strip()):
    kind = _text(task, "task")
  return [{"image": tgt, "source_image": src, "instruction": t, "edit_kind": kind} for t in texts]


# ---------------------------------------------------------------------------------------------
# Readers: each yields Units in a deterministic order.


def _expand(pattern: str, suffix: str) -> list[str]:
  """Files matching a glob, or every *suffix file under a directory; sorted."""
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, "**", f"*{suffix}")
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise DataError(f"--input={pattern} matches no files")
  return paths


def _json_caption(raw: bytes, keys: tuple[str, ...]):
  text = _text(raw, "caption")  # the json must be UTF-8 itself
  try:
    meta = json.loads(text)
  except ValueError as e:
    raise Skip("bad_text", f"unparsable .json ({e})") from None
  if not isinstance(meta, dict):
    raise Skip("bad_text", f".json holds a {type(meta).__name__}, not an object")
  for key in keys:
    if meta.get(key) is not None:
      return meta[key]
  raise Skip("missing_caption", f".json has none of the keys {list(keys)}")


def _tar_unit(record_id: str, group: dict, opts: PrepareOptions) -> Unit:
  image = next((group[ext] for ext in TAR_IMAGE_EXTENSIONS if ext in group), None)
  if image is None:
    return Unit(record_id, skip=Skip("missing_image", f"no member with an extension in "
                                     f"{TAR_IMAGE_EXTENSIONS} (has {sorted(group)})"))
  if isinstance(image, Skip):
    return Unit(record_id, skip=image)
  for ext in ("txt", "json"):
    if isinstance(group.get(ext), Skip):
      return Unit(record_id, skip=group[ext])
  if "txt" in group:
    caption = group["txt"]
  elif "json" in group:
    caption = functools.partial(_json_caption, group["json"], opts.caption_keys)
  else:
    caption = None
  return Unit(record_id, functools.partial(_caption_record, image, caption, opts))


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int):
  if member.size > limit:
    return Skip("too_large", f"member {member.name} of {member.size} bytes, above {limit}")
  return tar.extractfile(member).read()


def webdataset_units(pattern: str, opts: PrepareOptions) -> Iterator[Unit]:
  """Streams tar shards; consecutive members sharing a KEY form one example."""
  wanted = set(TAR_IMAGE_EXTENSIONS) | {"txt", "json"}
  for path in _expand(pattern, ".tar"):
    seen, key, group, members = set(), None, {}, 0
    try:
      with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
          members += 1
          match = _TAR_MEMBER.match(member.name) if member.isfile() else None
          if match is None:
            continue
          name, ext = match.group(1), match.group(2).lower()
          if name != key:
            if key is not None:
              yield _tar_unit(f"{path}:{key}", group, opts)
            if name in seen:
              # Members of one key must be adjacent (as webdataset writers make them).
              yield Unit(f"{path}:{name}", skip=Skip("duplicate_key", "key seen earlier in the "
                                                     "tar, its members are not adjacent"))
            seen.add(name)
            key, group = name, {}
          if ext in wanted and ext not in group:
            limit = MAX_FILE_BYTES if ext in TAR_IMAGE_EXTENSIONS else MAX_TEXT_BYTES
            group[ext] = _read_member(tar, member, limit)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
      # A truncated or corrupt tar: what was read before stays, the open key is dropped.
      yield Unit(f"{path} (after {members} members)",
                 skip=Skip("bad_tar", f"{type(e).__name__}: {e}"))
      continue
    if key is not None:
      yield _tar_unit(f"{path}:{key}", group, opts)


def _folder_record(source: FolderSource, index: int, opts: PrepareOptions):
  raw = source[index]
  if isinstance(raw, BadRecord):
    raise Skip("unreadable_file", raw.reason)
  captioned = source.caption_mode != "none"
  return _caption_record(raw["image"], raw.get("caption"), opts, captioned=captioned)


def folder_units(root: str, opts: PrepareOptions) -> Iterator[Unit]:
  """Images of a folder in the order of the 'folder:' data source (sorted walk)."""
  source = FolderSource(root)
  logging.info("prepare: %r", source)
  for index, rel in enumerate(source.files):
    make = functools.partial(_folder_record, source, index, opts)
    yield Unit(os.path.join(source.root, rel), make)


def _read_file(path: str) -> bytes:
  try:
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
      raise Skip("too_large", f"{path}: {size} bytes, above {MAX_FILE_BYTES}")
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise Skip("unreadable_file", f"{path}: {e.strerror or e}") from None


def _edit_from_files(source: str, target: str, instruction, task, opts: PrepareOptions):
  return _edit_records(_read_file(source), _read_file(target), [instruction], task, opts)


def edit_jsonl_units(pattern: str, opts: PrepareOptions) -> Iterator[Unit]:
  """Lines {"source", "target", "instruction"[, "task"]} of one or more JSONL files."""
  for path in _expand(pattern, ".jsonl"):
    base = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        record_id = f"{path}:{lineno}"
        try:
          entry = json.loads(_text(line, "line"))
          if not isinstance(entry, dict):
            raise Skip("bad_line", f"a JSON {type(entry).__name__}, not an object")
          missing = [k for k in ("source", "target") if not isinstance(entry.get(k), str)]
          if missing:
            raise Skip("bad_line", f"no string {missing} (keys: {sorted(entry)})")
        except ValueError as e:
          yield Unit(record_id, skip=Skip("bad_line", f"unparsable JSON ({e})"))
          continue
        except Skip as e:
          yield Unit(record_id, skip=e)
          continue
        src, tgt = (os.path.join(base, entry[k]) for k in ("source", "target"))
        yield Unit(record_id, functools.partial(_edit_from_files, src, tgt,
                                                entry.get("instruction"), entry.get("task"), opts))


def _image_cell(value):
  """The encoded bytes of an image cell: {'bytes': ..., 'path': ...} struct or plain binary."""
  if isinstance(value, dict):
    if value.get("bytes") is None:
      raise Skip("missing_image", f"image struct without bytes (path={value.get('path')!r})")
    return value["bytes"]
  if value is None:
    raise Skip("missing_image", "null image cell")
  if not isinstance(value, (bytes, bytearray)):
    raise Skip("missing_image", f"image cell is a {type(value).__name__}, not bytes")
  return value


def _omniedit_records(row: dict, opts: PrepareOptions):
  source = _image_cell(row[opts.source_column])
  target = _image_cell(row[opts.target_column])
  value = row[opts.instruction_column]
  if isinstance(value, (list, tuple)):
    instructions = list(value) if opts.instructions == "all" else list(value[:1])
  else:
    instructions = [value]
  task = row.get(opts.task_column) if opts.task_column else None
  return _edit_records(source, target, instructions, task, opts)


def omniedit_units(pattern: str, opts: PrepareOptions, *, batch_rows: int = 16) -> Iterator[Unit]:
  """Rows of OmniEdit-layout parquet files, read a few rows at a time (images are large)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  for path in _expand(pattern, ".parquet"):
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    required = [opts.source_column, opts.target_column, opts.instruction_column]
    optional = [c for c in (opts.task_column, opts.id_column) if c]
    if opts.min_score is not None:
      required.append(opts.score_column)
    missing = [c for c in required if c not in names]
    if missing:
      raise DataError(f"{path}: no column(s) {missing} (columns: {names}); name them with "
                      "--source_column / --target_column / --instruction_column / --score_column")
    columns = required + [c for c in optional if c in names and c not in required]
    row_index = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
      table = {c: batch.column(c).to_pylist() for c in columns}
      for i in range(batch.num_rows):
        row = {c: table[c][i] for c in columns}
        name = row.get(opts.id_column) if opts.id_column else None
        record_id = f"{path}#{row_index}" + (f" ({name})" if name else "")
        row_index += 1
        if opts.min_score is not None:
          score = row[opts.score_column]
          if score is None or not score >= opts.min_score:
            yield Unit(record_id, skip=Skip("below_min_score", f"{opts.score_column}={score} "
                                            f"< --min_score={opts.min_score}"))
            continue
        yield Unit(record_id, functools.partial(_omniedit_records, row, opts))


READERS = {"webdataset": webdataset_units, "folder": folder_units,
           "edit_jsonl": edit_jsonl_units, "omniedit_parquet": omniedit_units}


# ---------------------------------------------------------------------------------------------
# Running


def _run(unit: Unit):
  try:
    return unit.make()
  except Skip as e:
    return e


def ordered_results(units: Iterable[Unit], threads: int) -> Iterator[tuple[Unit, list | Skip]]:
  """(unit, records or Skip) in input order; `make` runs on `threads` threads (0: inline).

  At most 4 * threads units are in flight, so memory stays bounded on any corpus size.
  """
  if threads <= 0:
    for unit in units:
      yield unit, (unit.skip if unit.skip is not None else _run(unit))
    return
  pool = futures.ThreadPoolExecutor(threads, thread_name_prefix="prepare")
  pending = collections.deque()
  try:
    for unit in units:
      pending.append((unit, None if unit.skip is not None else pool.submit(_run, unit)))
      while len(pending) > 4 * threads:
        unit_done, fut = pending.popleft()
        yield unit_done, (unit_done.skip if fut is None else fut.result())
    while pending:
      unit_done, fut = pending.popleft()
      yield unit_done, (unit_done.skip if fut is None else fut.result())
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


class _Tally:
  """Writes the records of each result and counts inputs, skips (by kind) and kept uncaptioned."""

  def __init__(self):
    self.read = self.uncaptioned = 0
    self.skipped = collections.Counter()
    self.examples: list[dict] = []
    self.stopped = False

  def add(self, unit: Unit, result, writer: ShardWriter, max_records: int) -> bool:
    """Handles one input; returns False once max_records (> 0) records are written."""
    self.read += 1
    if isinstance(result, Skip):
      self.skipped[result.kind] += 1
      if len(self.examples) < MAX_SKIP_EXAMPLES:
        self.examples.append({"id": unit.record_id, "kind": result.kind, "reason": result.reason})
    else:
      for record in result:
        self.uncaptioned += "caption" in record and record["caption"] is None
        writer.write(record)
        if max_records and writer.num_written >= max_records:
          self.stopped = True
          return False
    if self.read % 10_000 == 0:
      logging.info("prepare: %d inputs read, %d records written, %d skipped", self.read,
                   writer.num_written, sum(self.skipped.values()))
    return True


def summary_path(out: str, prefix: str) -> str:
  """Where the summary goes: DIR/prepare_summary.json, or -PREFIX.json for other prefixes."""
  name = "prepare_summary.json" if prefix == "train" else f"prepare_summary-{prefix}.json"
  return os.path.join(out, name)


def prepare(inputs: str, fmt: str, out: str, *, prefix: str = "train",
            records_per_shard: int = 1000, options: PrepareOptions = PrepareOptions(),
            max_records: int = 0, threads: int = 8, overwrite: bool = False) -> dict:
  """Converts `inputs` (--input, see the module docstring) to `out/{prefix}-NNNNN.array_record`.

  Returns the summary dict (also written to summary_path(out, prefix)). max_records > 0 stops
  after that many records. Refuses to mix with existing shards of the same prefix unless
  `overwrite`, which deletes them first.
  """
  if fmt not in READERS:
    raise DataError(f"unknown --format={fmt!r}; known: {FORMATS}")
  if options.instructions not in ("first", "all"):
    raise DataError(f"--instructions must be 'first' or 'all', got {options.instructions!r}")
  if options.image_size < 0 or not 1 <= options.jpeg_quality <= 100:
    raise DataError(f"need --image_size >= 0 and 1 <= --jpeg_quality <= 100, got "
                    f"{options.image_size}, {options.jpeg_quality}")
  shard_glob = os.path.join(glob.escape(out), f"{glob.escape(prefix)}-*.array_record")
  existing = sorted(glob.glob(shard_glob))
  if existing and not overwrite:
    raise DataError(f"{out} already holds {len(existing)} '{prefix}-*.array_record' shards; "
                    "pass --overwrite to replace them or pick another --out / --prefix")
  for path in existing:
    os.remove(path)
  start = time.time()
  tally = _Tally()
  writer = ShardWriter(out, prefix, records_per_shard)
  try:
    with contextlib.closing(ordered_results(READERS[fmt](inputs, options), threads)) as results:
      for unit, result in results:
        if not tally.add(unit, result, writer, max_records):
          break
  finally:
    shards = writer.close()
  summary = {
      "format": fmt, "input": inputs, "out": os.path.abspath(out), "prefix": prefix,
      "data_source": f"arrayrecord:{os.path.join(os.path.abspath(out), prefix)}-*.array_record",
      "inputs_read": tally.read, "records_written": writer.num_written,
      "skipped": sum(tally.skipped.values()),
      "skipped_by_kind": dict(sorted(tally.skipped.items())),
      "skipped_examples": tally.examples, "uncaptioned_kept": tally.uncaptioned,
      "stopped_at_max_records": tally.stopped,
      "shards": [os.path.basename(p) for p in shards],
      "options": {k: (list(v) if isinstance(v, tuple) else v)
                  for k, v in dataclasses.asdict(options).items()},
      "seconds": round(time.time() - start, 3),
  }
  os.makedirs(out, exist_ok=True)
  with open(summary_path(out, prefix), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return summary


# ---------------------------------------------------------------------------------------------
# Command line

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  defaults = PrepareOptions()
  flags.DEFINE_string("input", None, "glob / directory / file of the inputs (see --format)")
  flags.DEFINE_enum("format", None, list(FORMATS), "input layout")
  flags.DEFINE_string("out", None, "output directory for the shards and the summary")
  flags.DEFINE_string("prefix", "train", "shard file name prefix: PREFIX-NNNNN.array_record")
  flags.DEFINE_integer("records_per_shard", 1000, "records per ArrayRecord shard")
  flags.DEFINE_integer("max_records", 0, "stop after this many records (0 = all)")
  flags.DEFINE_integer("threads", min(8, os.cpu_count() or 1), "decoding threads (0 = inline)")
  flags.DEFINE_bool("overwrite", False, "replace existing PREFIX-*.array_record shards in --out")
  flags.DEFINE_integer("image_size", 0, "0: store images unchanged; S: shorter side above S -> "
                       "resized to S and stored as JPEG")
  flags.DEFINE_integer("jpeg_quality", defaults.jpeg_quality, "JPEG quality with --image_size")
  flags.DEFINE_integer("max_image_pixels", defaults.max_image_pixels,
                       "images whose header claims more pixels are skipped")
  flags.DEFINE_integer("min_image_size", defaults.min_image_size,
                       "images whose shorter side is below this are skipped")
  flags.DEFINE_bool("keep_uncaptioned", False, "write records with a missing / unreadable caption "
                    "with caption None instead of skipping them")
  flags.DEFINE_list("caption_keys", list(defaults.caption_keys),
                    "webdataset .json keys holding the caption, in order of preference")
  flags.DEFINE_string("source_column", defaults.source_column, "parquet: source image column")
  flags.DEFINE_string("target_column", defaults.target_column, "parquet: edited image column")
  flags.DEFINE_string("instruction_column", defaults.instruction_column,
                      "parquet: instruction column (list<string> or string)")
  flags.DEFINE_string("task_column", defaults.task_column, "parquet: edit type column ('' = none)")
  flags.DEFINE_string("id_column", defaults.id_column, "parquet: id column naming skipped rows "
                      "('' = none)")
  flags.DEFINE_enum("instructions", defaults.instructions, ["first", "all"],
                    "parquet list of instructions: the first only, or a record for each")
  flags.DEFINE_string("score_column", defaults.score_column, "parquet: score column for --min_score")
  flags.DEFINE_float("min_score", None, "parquet: skip rows whose --score_column is below this")


def options_from_flags() -> PrepareOptions:
  """PrepareOptions with every field taken from the flag of the same name."""
  return PrepareOptions(**{f.name: (tuple(FLAGS[f.name].value) if f.name == "caption_keys"
                                    else FLAGS[f.name].value)
                           for f in dataclasses.fields(PrepareOptions)})


def main(argv):
  cli.no_arguments(argv)
  summary = prepare(FLAGS.input, FLAGS.format, FLAGS.out, prefix=FLAGS.prefix,
                    records_per_shard=FLAGS.records_per_shard, options=options_from_flags(),
                    max_records=FLAGS.max_records, threads=FLAGS.threads,
                    overwrite=FLAGS.overwrite)
  print(json.dumps(summary, indent=2))
  if summary["records_written"] == 0:
    where = summary_path(FLAGS.out, FLAGS.prefix)
    raise SystemExit(f"no usable records in {FLAGS.input}; see {where}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["input", "format", "out"])
  app.run(main)
