"""Caches the T2I stage's frozen inputs: PS-VAE latents and text-encoder states, once per corpus.

  python -m psvae_jax.tools.cache_latents --workdir=T2I_OR_PSVAE_RUN --data=SOURCE --out=DIR \
      [--text_encoder=qwen2.5-0.5b --text_encoder_init=CONVERTED_DIR --tokenizer=HF_DIR \
       --max_text_len=256] [--num_examples=N] [--batch_size=B] [--dtype=float32|bfloat16] \
      [--records_per_shard=1000] [--image_size=S]

Every image-caption pair of SOURCE (a data.source spec, read whole and in order; undecodable
records are skipped and counted, within --max_bad_fraction) goes through exactly what the T2I
stage computes from it:
  latent       (h, w, C)  (E_s(encoder(image)).mean - mean) / std, the normalised PS-VAE latent;
  text_states  (L, D)     the frozen text encoder's last hidden state of the tokenised caption,
                          L = max_text_len (right padded), D its width;
  text_mask    (L,) int32 1 on real tokens;
  caption      the caption itself (str).
Records are written as ArrayRecord shards (psvae_jax/data/shards.py) DIR/train-NNNNN.array_record,
with DIR/cache_summary.json saying what was cached and how to train on it:
  python -m psvae_jax.main --config=configs/t2i.py ... --config.model.cached_inputs=True \
      --config.data.source='arrayrecord:DIR/train-*.array_record'
The T2I run must use the same PS-VAE (config.init), text encoder and max_text_len: the cache
fixes them (shapes are checked when a batch arrives), and the text encoder still encodes the
empty caption of dropped captions and CFG.

WORKDIR may be
  a T2I run: its own encoder, E_s, latent statistics, text encoder, tokenizer and max_text_len
             (EMA-independent: all of these are frozen in T2I);
  a PS-VAE run: its EMA encoder and E_s and its latent statistics, loaded as the T2I stage loads
             them (config.init), with the text encoder from --text_encoder_init (a converted
             Qwen2 directory, `python -m psvae_jax.tools.convert`) and --tokenizer.
Images are resized to --image_size (default: the run's data.image_size). Storage per example is
L * D * 4 bytes of text states in float32 (256 x 896: 0.9 MB); --dtype=bfloat16 halves it.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from psvae_jax import runs, sharding
from psvae_jax.config_base import ConfigError
from psvae_jax.runs import default_mesh, run_config
from psvae_jax.tools import cli, files

DTYPES = ("float32", "bfloat16")
SUMMARY_NAME = "cache_summary.json"


# --- the model ---------------------------------------------------------------------------------

def t2i_config_for_psvae(psvae_config, *, text_encoder: str, text_encoder_init: str,
                         tokenizer: str, max_text_len: int, psvae_dir: str):
  """A T2I config whose frozen parts are the PS-VAE run's and the given text encoder; the
  generator (unused here) is the tiny preset."""
  from psvae_jax.config_loader import load_config

  if not text_encoder_init:
    raise ConfigError("--text_encoder_init is required with a PS-VAE run: the cached text "
                      "states must come from the pretrained text encoder the T2I run will "
                      "load (a random one could not be reproduced)")
  if not tokenizer:
    raise ConfigError("--tokenizer is required with a PS-VAE run ('bytes' or the tokenizer "
                      "directory of the text encoder's checkpoint)")
  config = load_config("configs/t2i.py")
  with config.unlocked():
    config.model.generator = "tiny"
    config.model.ddt_head = False
    config.model.text_encoder = text_encoder
    config.model.text_encoder_init = text_encoder_init
    config.model.tokenizer = tokenizer
    config.model.max_text_len = int(max_text_len)
    config.init = psvae_dir
    config.data.image_size = int(psvae_config.data.image_size)
    config.optim.ema_decay = 0.0
  return runs.inherit_parent_sections(config, psvae_config)  # the PS-VAE run's autoencoder


def load_frozen_model(workdir: str, *, mesh, text_encoder: str = "qwen2.5-0.5b",
                      text_encoder_init: str = "", tokenizer: str = "",
                      max_text_len: int = 256):
  """(T2I task, model, description) with the frozen T2I inputs of a T2I or PS-VAE run."""
  from psvae_jax import train_state as ts
  from psvae_jax.tasks import get_task

  stored = run_config(workdir)
  if stored.task == "t2i":
    given = [f for f, v in (("text_encoder_init", text_encoder_init), ("tokenizer", tokenizer))
             if v]
    if given:
      raise ConfigError(f"{workdir} is a T2I run: its own text encoder and tokenizer are used; "
                        f"drop --{', --'.join(given)}")
    from psvae_jax import api
    task, model, config, extras, _ = api._open_run(workdir, None, True, mesh)
    return task, model, {"run": workdir, "run_task": "t2i", "step": int(extras["step"])}
  if stored.task != "psvae":
    raise ConfigError(f"{workdir}: a {stored.task!r} run; cache_latents reads a T2I or a "
                      "PS-VAE run")
  config = t2i_config_for_psvae(stored, text_encoder=text_encoder,
                                text_encoder_init=text_encoder_init, tokenizer=tokenizer,
                                max_text_len=max_text_len, psvae_dir=workdir)
  task = get_task(config)
  with jax.set_mesh(mesh):
    layout = ts.make_train_setup(task, config, mesh)
    state = ts.init_state(task, config, layout)
    params = runs.init_params(task, ts.all_params(state), workdir, mesh)
    trainable, frozen = ts.split_params(layout, params)
    model = layout.merge(trainable, frozen, state["other"])
  return task, model, {"run": workdir, "run_task": "psvae", "text_encoder_init":
                       text_encoder_init}


def make_encode_fn(task, model):
  """Jitted (state, images, input_ids, attention_mask) -> (latents, text states)."""
  from psvae_jax.tasks import t2i

  graphdef, _ = nnx.split(model)
  ae = task.config.model.autoencoder

  def run(state, images, ids, mask):
    m = nnx.merge(graphdef, state)
    return t2i.image_latents(m, images, ae), t2i.text_states(m, ids, mask)

  return jax.jit(run)


# --- the data ----------------------------------------------------------------------------------

def source_config(data: str, image_size: int, num_examples: int, max_bad_fraction: float):
  """The whole of `data` (nothing held out, source order) at `image_size`."""
  from psvae_jax import data as data_lib

  cfg = {"source": data, "image_size": int(image_size), "eval_size": 0, "shuffle": False,
         "max_bad_fraction": float(max_bad_fraction)}
  if data_lib.parse_source(data).scheme == "synthetic":
    if num_examples < 1:
      raise ValueError(f"--data={data}: a synthetic world is endless; pass --num_examples")
    cfg["synthetic_size"] = int(num_examples)
  return data_lib.resolve_data_config(cfg)


class SourceReader:
  """Iterates the prepared examples ('image', 'caption', ...) of a source once, in order;
  undecodable records are skipped and counted (`seen`, `bad`, `examples_of_bad`) within
  cfg.max_bad_fraction."""

  def __init__(self, cfg, num_examples: int = 0):
    from psvae_jax.data import sources

    self.cfg = cfg
    self.source = sources.train_source(cfg)
    self.length = len(self.source) if num_examples < 1 else min(len(self.source),
                                                                 int(num_examples))
    self.seen = self.bad = 0
    self.examples_of_bad: list[str] = []

  def __iter__(self):
    import grain

    from psvae_jax.data.errors import BadRecord, DataError, check_bad_fraction
    from psvae_jax.data.preprocess import prepare_example

    cfg = self.cfg
    ds = grain.MapDataset.source(self.source)[:self.length].map(
        lambda raw: prepare_example(raw, cfg))
    options = grain.ReadOptions(num_threads=cfg.read_threads,
                                prefetch_buffer_size=4 * max(1, cfg.read_threads))
    for element in ds.to_iter_dataset(options):
      self.seen += 1
      if isinstance(element, BadRecord):
        self.bad += 1
        if len(self.examples_of_bad) < 10:
          self.examples_of_bad.append(element.describe())
        check_bad_fraction(self.seen, self.bad, cfg.max_bad_fraction, self.examples_of_bad)
        continue
      if "caption" not in element:
        raise DataError(f"--data={cfg.source} yields no captions (fields: "
                        f"{sorted(k for k in element if not k.startswith('_'))}); the cache "
                        "needs image-caption pairs")
      yield element


# --- the tool ----------------------------------------------------------------------------------

def cache_latents(workdir: str, data: str, out: str, *, text_encoder: str = "qwen2.5-0.5b",
                  text_encoder_init: str = "", tokenizer: str = "", max_text_len: int = 256,
                  num_examples: int = 0, batch_size: int = 0, dtype: str = "float32",
                  image_size: int = 0, records_per_shard: int = 1000, prefix: str = "train",
                  max_bad_fraction: float = 0.01, mesh=None) -> dict[str, Any]:
  """Writes the cache (see the module docstring); returns the summary written next to it."""
  import ml_dtypes

  from psvae_jax.data.loader import collate
  from psvae_jax.data.shards import ShardWriter
  from psvae_jax.tokenizers import tokenize

  started = time.perf_counter()
  if jax.process_count() > 1:
    raise NotImplementedError("cache_latents runs in one process (any number of local devices)")
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {DTYPES}")
  mesh = default_mesh() if mesh is None else mesh
  dp = sharding.data_parallel_size(mesh)
  batch_size = batch_size or 8 * dp
  if batch_size < 1 or batch_size % dp:
    raise ValueError(f"--batch_size={batch_size} must be a positive multiple of the {dp} "
                     "devices the batch is split over")
  if os.path.isdir(out) and any(n.startswith(f"{prefix}-") for n in os.listdir(out)):
    raise FileExistsError(f"--out={out} already holds {prefix}-* shards; choose another "
                          "directory or --prefix")
  task, model, origin = load_frozen_model(
      workdir, mesh=mesh, text_encoder=text_encoder, text_encoder_init=text_encoder_init,
      tokenizer=tokenizer, max_text_len=max_text_len)
  m = task.config.model
  size = int(image_size or task.config.data.image_size)
  cfg = source_config(data, size, num_examples, max_bad_fraction)
  encode = make_encode_fn(task, model)
  state = nnx.state(model)
  store = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  batch_sh = {n: sharding.batch_sharding(mesh, n) for n in (2, 4)}

  def flush(chunk, writer):
    valid = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - valid)  # one shape for every batch
    batch = collate([{"image": e["image"], "caption": e["caption"]} for e in chunk])
    ids, mask = tokenize(task.tokenizer, list(batch["caption"]), m.max_text_len)
    with jax.set_mesh(mesh):
      latents, states = encode(state, jax.device_put(batch["image"], batch_sh[4]),
                               jax.device_put(ids, batch_sh[2]),
                               jax.device_put(mask, batch_sh[2]))
    latents = np.asarray(jax.device_get(latents)).astype(store)
    states = np.asarray(jax.device_get(states)).astype(store)
    for i in range(valid):
      writer.write({"latent": latents[i], "text_states": states[i], "text_mask": mask[i],
                    "caption": str(batch["caption"][i])})

  reader = SourceReader(cfg, num_examples)
  chunk: list[dict] = []
  with ShardWriter(out, prefix, records_per_shard) as writer:
    for element in reader:
      chunk.append(element)
      if len(chunk) == batch_size:
        flush(chunk, writer)
        chunk = []
    if chunk:
      flush(chunk, writer)
    paths = writer.close()
    written = writer.num_written
  if not written:
    raise ValueError(f"--data={data}: no usable image-caption pairs were found")
  grid = task.grid
  summary: dict[str, Any] = {
      **origin, "data": data, "image_size": size, "records": int(written),
      "seen": reader.seen, "bad": reader.bad, "examples_of_bad": reader.examples_of_bad,
      "shards": [os.path.abspath(p) for p in paths], "dtype": dtype,
      "fields": {"latent": [grid, grid, int(m.autoencoder.latent_channels)],
                 "text_states": [int(m.max_text_len), int(task.generator.text_dim)],
                 "text_mask": [int(m.max_text_len)], "caption": "str"},
      "text_encoder": m.text_encoder, "tokenizer": m.tokenizer,
      "max_text_len": int(m.max_text_len),
      "autoencoder": m.autoencoder.to_dict(),
      "data_source": f"arrayrecord:{os.path.abspath(out)}/{prefix}-*.array_record",
      "train_with": ("--config.model.cached_inputs=True --config.data.source="
                     f"'arrayrecord:{os.path.abspath(out)}/{prefix}-*.array_record' "
                     f"--config.model.max_text_len={int(m.max_text_len)}"),
  }
  summary["elapsed_s"] = round(time.perf_counter() - started, 2)
  name = SUMMARY_NAME if prefix == "train" else f"cache_summary-{prefix}.json"
  files.write_json(os.path.join(out, name), summary)
  return summary


# --- command line ------------------------------------------------------------------------------

def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "A T2I run or a PS-VAE run (its workdir).", **f)
  flags.DEFINE_string("data", None, "Image-caption source (folder:PATH, arrayrecord:GLOB, "
                      "tfds:NAME[:SPLIT], synthetic:shapes|single), read whole.", **f)
  flags.DEFINE_string("out", None, "Output directory for the shards and cache_summary.json.",
                      **f)
  flags.DEFINE_string("text_encoder", "qwen2.5-0.5b", "Text encoder preset (PS-VAE runs).", **f)
  flags.DEFINE_string("text_encoder_init", "", "Converted text encoder weights (PS-VAE runs).",
                      **f)
  flags.DEFINE_string("tokenizer", "", "'bytes' or a tokenizer directory (PS-VAE runs).", **f)
  flags.DEFINE_integer("max_text_len", 256, "Text tokens per caption (PS-VAE runs).", **f)
  flags.DEFINE_integer("num_examples", 0, "Examples to cache (0 = the whole source; needed "
                       "for synthetic sources).", **f)
  flags.DEFINE_integer("batch_size", 0, "Images per batch (multiple of the device count; 0 = "
                       "8 per device).", **f)
  flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Stored dtype of latents and text "
                    "states.", **f)
  flags.DEFINE_integer("image_size", 0, "Image size (0 = the run's data.image_size).", **f)
  flags.DEFINE_integer("records_per_shard", 1000, "Records per ArrayRecord shard.", **f)
  flags.DEFINE_string("prefix", "train", "Shard file name prefix.", **f)
  flags.DEFINE_float("max_bad_fraction", 0.01, "Bound on undecodable records.", **f)


def run_from_flags(flag_values=flags.FLAGS) -> dict[str, Any]:
  v = flag_values
  cli.require_flags(v, "workdir", "data", "out")
  return cache_latents(v.workdir, v.data, v.out, text_encoder=v.text_encoder,
                       text_encoder_init=v.text_encoder_init, tokenizer=v.tokenizer,
                       max_text_len=v.max_text_len, num_examples=v.num_examples,
                       batch_size=v.batch_size, dtype=v.dtype, image_size=v.image_size,
                       records_per_shard=v.records_per_shard, prefix=v.prefix,
                       max_bad_fraction=v.max_bad_fraction)


main = cli.json_main(run_from_flags, keys=("records", "bad", "dtype", "fields", "data_source",
                                           "train_with", "elapsed_s"))


if __name__ == "__main__":
  define_flags()
  app.run(main)
