"""grain pipelines: the checkpointable per-process training iterator and held-out eval batches.

Training pipeline (grain Dataset API):
  source -> global shuffle (reshuffled per epoch) -> repeat forever -> decode + preprocess
  (lazy, per global position) -> this process's positions p, p+P, p+2P, ... -> read threads ->
  skip bad records (counted) -> batch of B/P -> [worker processes, supervised (workers.py) |
  thread prefetch] -> DataIterator (counters, bad-record bound).
Process p of P takes every P-th position of one global order, so processes see disjoint
examples, and (with no bad records, num_workers=0) the union of their local batches k is the
global batch k of a single process.

Limits: with num_workers > 0 each worker batches its own slice, so batch composition (still
deterministic) and the iterator state depend on num_workers; a state restores only under the
same source, seed, process count and num_workers.

Bad records never reach a batch: they are dropped right after decoding and the number skipped
before each example travels with it ('_skipped', '_skip_note'), so the counts stay exact with
worker processes too; DataIterator sums them, exposes stats() and raises DataError past
data.max_bad_fraction. The counters are part of the iterator state (checkpointed).
"""
import atexit
import dataclasses
import functools
import os
import weakref
from typing import Any, Sequence

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from psvae_jax.console import say
from psvae_jax.data import sources
from psvae_jax.data import workers
from psvae_jax.data.config import default_data_config
from psvae_jax.data.errors import BadRecord, DataError, check_bad_fraction
from psvae_jax.data.preprocess import prepare_example
from psvae_jax.storage_retry import RetryPolicy

# More bad records than this in a row (between two good ones) stops the pipeline: without it a
# source where every record is bad would spin forever instead of reporting.
MAX_CONSECUTIVE_BAD = 1000
_MAX_EXAMPLES_KEPT = 10


def resolve_data_config(data_config) -> ml_collections.ConfigDict:
  """Defaults overlaid with `data_config` (ConfigDict or dict); unknown keys and bad values raise."""
  cfg = default_data_config()
  given = data_config.to_dict() if isinstance(data_config, ml_collections.ConfigDict) else dict(data_config)
  unknown = sorted(set(given) - set(cfg.keys()))
  if unknown:
    raise DataError(f"unknown data config keys {unknown}; known: {sorted(cfg.keys())}")
  try:
    cfg.update(given)
  except TypeError as e:
    raise DataError(f"data config: {e}") from None
  checks = {
      "image_size": cfg.image_size >= 8,
      "num_workers": cfg.num_workers >= 0,
      "read_threads": cfg.read_threads >= 0,
      "prefetch": cfg.prefetch >= 0,
      "max_bad_fraction": 0.0 <= cfg.max_bad_fraction <= 1.0,
      "max_image_pixels": cfg.max_image_pixels >= 1,
      "min_image_size": cfg.min_image_size >= 1,
      "synthetic_size": cfg.synthetic_size >= 1,
      "eval_size": cfg.eval_size >= 0,
      "worker_timeout_s": cfg.worker_timeout_s >= 0,
      "worker_restarts": cfg.worker_restarts >= 0,
  }
  bad = [k for k, ok in checks.items() if not ok]
  if bad:
    raise DataError("invalid data config values: " + ", ".join(f"{k}={cfg[k]!r}" for k in bad))
  return cfg


@dataclasses.dataclass(frozen=True)
class _PrepConfig:
  """The preprocessing settings (a plain picklable object, cheap to read per example)."""
  image_size: int
  max_image_pixels: int
  min_image_size: int
  skip_uncaptioned: bool

  @classmethod
  def from_data_config(cls, cfg):
    return cls(cfg.image_size, cfg.max_image_pixels, cfg.min_image_size, cfg.skip_uncaptioned)


def _mix64(x: int) -> int:
  """splitmix64 finaliser: a cheap, well-mixed hash for per-example coin flips."""
  x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
  return x ^ (x >> 31)


class _Prepare:
  """map_with_index transform: raw record at global position -> example or BadRecord."""

  def __init__(self, prep: _PrepConfig, seed: int, random_flip: bool):
    self.prep, self.seed, self.random_flip = prep, seed, random_flip

  def __call__(self, position: int, raw):
    flip = self.random_flip and bool(_mix64(_mix64(self.seed) ^ position) & 1)
    return prepare_example(raw, self.prep, flip=flip)


class _SkipBadIterDataset(grain.IterDataset):
  """Drops BadRecords; each good example carries how many were dropped just before it."""

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__())


class _SkipBadIterator(grain.DatasetIterator):

  def __next__(self):
    skipped, note = 0, ""
    while True:
      element = next(self._parent)
      if not isinstance(element, BadRecord):
        break
      skipped += 1
      note = note or element.describe()
      if skipped >= MAX_CONSECUTIVE_BAD:
        raise DataError(f"{skipped} bad records in a row and none usable; first: {note}")
    element["_skipped"] = skipped
    element["_skip_note"] = note
    return element

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def _fill_missing_captions(examples: Sequence[dict]) -> Sequence[dict]:
  """A record without a 'caption' field among captioned ones gets the empty caption, counted as
  a caption fallback (as a missing .txt or an undecodable caption is)."""
  with_caption = sum("caption" in ex for ex in examples)
  if with_caption in (0, len(examples)):
    return examples
  return [ex if "caption" in ex else {**ex, "caption": "", "_caption_fallback": True}
          for ex in examples]


def collate(examples: Sequence[dict]) -> dict:
  """Stacks example dicts into a batch: arrays stacked, str fields as object arrays of str."""
  examples = _fill_missing_captions(examples)
  keys = list(examples[0])
  for ex in examples[1:]:
    if set(ex) != set(keys):
      raise DataError(f"records of one batch have different fields: {sorted(keys)} vs {sorted(ex)}")
  out = {}
  for key in keys:
    values = [ex[key] for ex in examples]
    if isinstance(values[0], str):
      arr = np.empty(len(values), dtype=object)
      arr[:] = values
      out[key] = arr
      continue
    try:
      out[key] = np.stack([np.asarray(v) for v in values])
    except ValueError as e:
      raise DataError(f"field {key!r} has different shapes within a batch: {e}") from None
  return out


class DataIterator(grain.DatasetIterator):
  """The training iterator: yields batch dicts, counts bad records, checkpointable.

  get_state()/set_state() (JSON-serialisable) hold the pipeline position and the counters;
  Orbax saves it through grain.checkpoint.CheckpointSave(it) / CheckpointRestore(it).
  """

  def __init__(self, parent: grain.DatasetIterator, max_bad_fraction: float, description: str):
    super().__init__(parent)
    self._max_bad_fraction = max_bad_fraction
    self._description = description
    self._seen = self._bad = self._caption_fallback = 0
    self._examples: list[str] = []
    # An iterator still alive at interpreter exit is closed (threads, worker processes) while
    # the modules grain needs for a clean stop still exist.
    self._at_exit = functools.partial(_close_if_alive, weakref.ref(self))
    atexit.register(self._at_exit)

  def close(self) -> None:
    if self._closed:
      return
    super().close()
    self._parents = ()  # release the pipeline now, not at interpreter teardown
    atexit.unregister(self._at_exit)

  def __next__(self) -> dict:
    self._assert_not_closed()
    batch = next(self._parent)
    skipped = batch.pop("_skipped")
    notes = batch.pop("_skip_note")
    fallback = batch.pop("_caption_fallback")
    self._bad += int(skipped.sum())
    self._seen += int(skipped.sum()) + len(skipped)
    self._caption_fallback += int(fallback.sum())
    for note in notes:
      if note and len(self._examples) < _MAX_EXAMPLES_KEPT:
        self._examples.append(note)
    check_bad_fraction(self._seen, self._bad, self._max_bad_fraction, self._examples)
    return batch

  def stats(self) -> dict:
    """{'seen', 'bad', 'caption_fallback', 'examples_of_bad'}: counts over this process's reads."""
    return {"seen": self._seen, "bad": self._bad, "caption_fallback": self._caption_fallback,
            "examples_of_bad": list(self._examples)}

  @property
  def worker_restarts(self) -> int:
    """How often this launch restarted the worker processes (0 without workers)."""
    return getattr(self._parent, "restarts", 0)

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._parent.get_state(), **self.stats()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["pipeline"])
    self._seen, self._bad = int(state["seen"]), int(state["bad"])
    self._caption_fallback = int(state["caption_fallback"])
    self._examples = list(state["examples_of_bad"])

  def __str__(self):
    return f"DataIterator({self._description})"


def _close_if_alive(ref) -> None:
  it = ref()
  if it is not None:
    it.close()


def _process(process_index, process_count) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if count < 1 or not 0 <= index < count:
    raise DataError(f"process_index={index} is not in [0, process_count={count})")
  return index, count


def _read_options(cfg) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=cfg.read_threads,
                           prefetch_buffer_size=4 * cfg.read_threads)


def make_train_iterator(data_config, *, global_batch_size: int, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None,
                        read_retry: RetryPolicy | None = None) -> DataIterator:
  """The endless, shuffled, checkpointable iterator of this process's batches.

  Each batch holds global_batch_size // process_count rows: 'image' uint8 (B, S, S, 3), and as
  the source provides: 'caption' (object array of str), 'label' int32, 'source_image' uint8,
  'instruction' str, 'edit_mask' bool (B, S, S), 'scene'/'edit_kind' str (synthetic), cached
  arrays. Deterministic in `seed`; processes (default: jax's) read disjoint examples.
  `read_retry`: how reads retry transient storage errors (config.io; default its defaults).
  """
  cfg = resolve_data_config(data_config)
  index, count = _process(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % count:
    raise DataError(f"global_batch_size={global_batch_size} is not a positive multiple of "
                    f"process_count={count}")
  if not 0 <= seed < 2**32:
    raise DataError(f"seed must be in [0, 2**32), got {seed}")
  spec = sources.parse_source(cfg.source)
  if cfg.random_flip and spec.scheme == "synthetic":
    raise DataError("data.random_flip would contradict the left/right words of synthetic "
                    "captions and instructions; keep it False for synthetic sources")
  source = sources.train_source(cfg, read_retry)
  ds = grain.MapDataset.source(source)
  if cfg.shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)
  ds = ds.map_with_index(_Prepare(_PrepConfig.from_data_config(cfg), seed, cfg.random_flip))
  ds = ds[index::count]
  it_ds = _SkipBadIterDataset(ds.to_iter_dataset(_read_options(cfg)))
  it_ds = it_ds.batch(global_batch_size // count, drop_remainder=True, batch_fn=collate)
  description = f"{source!r}, process {index}/{count}, seed {seed}"
  if cfg.num_workers > 0:
    # grain's worker processes read absl flags; outside an absl app (tests, notebooks) they
    # were never parsed, so their defaults are taken.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                     per_worker_buffer_size=max(1, cfg.prefetch)),
        worker_init_fn=functools.partial(workers.end_with_parent, os.getpid()))
    pipeline = workers.SupervisedWorkerIterator(
        it_ds, num_workers=cfg.num_workers, timeout_s=cfg.worker_timeout_s,
        max_restarts=cfg.worker_restarts, description=description)
  else:
    if cfg.prefetch > 0:
      it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds,
                                                           prefetch_buffer_size=cfg.prefetch)
    pipeline = it_ds.__iter__()
  logging.info("training data: %s, %d rows per process batch", description,
               global_batch_size // count)
  return DataIterator(pipeline, cfg.max_bad_fraction, description)


def make_eval_batches(data_config, *, batch_size: int, num_batches: int, seed: int = 0,
                      read_retry: RetryPolicy | None = None) -> list[dict]:
  """`num_batches` deterministic batches of held-out data (the same on every process).

  Held-out data: data.eval_source if set; else a disjoint synthetic index range, a fixed subset
  of a folder/arrayrecord source kept out of training, or a tfds source's validation split.
  `seed` orders the held-out examples. Bad records are skipped and counted like in training;
  `read_retry` as in make_train_iterator.
  """
  cfg = resolve_data_config(data_config)
  if batch_size < 1 or num_batches < 1:
    raise DataError(f"batch_size and num_batches must be >= 1, got {batch_size}, {num_batches}")
  source = sources.eval_source(cfg, read_retry)
  ds = grain.MapDataset.source(source).shuffle(seed=seed)
  ds = ds.map_with_index(_Prepare(_PrepConfig.from_data_config(cfg), seed, False))
  needed = batch_size * num_batches
  good, bad, examples = [], 0, []
  for element in ds.to_iter_dataset(_read_options(cfg)):
    if isinstance(element, BadRecord):
      bad += 1
      if len(examples) < _MAX_EXAMPLES_KEPT:
        examples.append(element.describe())
      continue
    element.pop("_caption_fallback")
    good.append(element)
    if len(good) == needed:
      break
  check_bad_fraction(len(good) + bad, bad, cfg.max_bad_fraction, examples)
  if not good:
    raise DataError(f"held-out data {source!r} has no usable example ({bad} bad); add images "
                    "or set data.eval_source")
  if bad:
    logging.warning("eval data: skipped %d bad records, e.g. %s", bad, examples[:3])
  if len(good) < needed:
    # A small held-out set: as many batches as it fills, the last completed by repeating it.
    num_batches = -(-len(good) // batch_size)
    say("data: eval on the %d usable held-out examples, repeated to fill %d batch(es) of %d",
        len(good), num_batches, batch_size)
    good = [good[i % len(good)] for i in range(num_batches * batch_size)]
  return [collate(good[i * batch_size:(i + 1) * batch_size]) for i in range(num_batches)]
