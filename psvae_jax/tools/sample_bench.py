"""Samples a T2I run on GenEval or DPG-Bench prompts, in the layout each official scorer reads.

  python -m psvae_jax.tools.sample_bench --workdir=T2I_RUN --bench=geneval \
      --prompts=PATH/evaluation_metadata.jsonl --out=DIR [--samples_per_prompt=4]
  python -m psvae_jax.tools.sample_bench --workdir=T2I_RUN --bench=dpg \
      --prompts=DPG_BENCH/prompts --out=DIR [--samples_per_prompt=4]
  common: [--batch_size=B] [--sample_steps=S] [--cfg_scale=G] [--seed=K] [--max_prompts=N]
          [--use_ema]

The prompt files come with the benchmarks (GenEval: prompts/evaluation_metadata.jsonl, one JSON
object with at least 'prompt' per line; DPG-Bench: a directory of NAME.txt files, one prompt
each); the scores come from their own scripts (GenEval: evaluation/evaluate_images.py then
summary_scores.py; DPG-Bench: compute_dpg_bench.py with --resolution=<image size> and
--pic-num=<samples per prompt>). Layouts written:
  geneval  DIR/<index:05d>/metadata.jsonl   the prompt's metadata line (one JSON object)
           DIR/<index:05d>/samples/<k:04d>.png   samples_per_prompt images
           DIR/<index:05d>/grid.png         the samples side by side
  dpg      DIR/<NAME>.png                   samples_per_prompt (1..4) images tiled 2x2 without
                                            gutters (left to right, top to bottom), the grid
                                            compute_dpg_bench.py crops at --resolution
Images come from the run's EMA generator with its sampler settings (config.flow; flags override)
at the run's image size. Prompts are sampled in fixed groups (as many whole prompts as fill a
batch) and group g draws its noise from fold_in(seed, g), so an interrupted run restarted with
the same flags skips the finished groups and draws the same images for the rest. A summary
(settings, counts, the scoring command) goes to DIR/sample_bench.json (compute_dpg_bench.py
tries every file of its folder and reports this one as a failed file name; it scores the rest).
"""
from __future__ import annotations

import glob
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from psvae_jax import sharding
from psvae_jax.runs import default_mesh, load_run_model
from psvae_jax.tools import cli, files

BENCHES = ("geneval", "dpg")
MAX_DPG_SAMPLES = 4  # compute_dpg_bench.py crops at most a 2x2 grid


# --- prompts -----------------------------------------------------------------------------------

def read_geneval_prompts(path: str) -> list[dict]:
  """GenEval's metadata lines (dicts with 'prompt'), in file order."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--prompts={path}: no such file (GenEval's "
                            "prompts/evaluation_metadata.jsonl)")
  entries = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
      except ValueError as e:
        raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
      if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
        raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'prompt' string")
      entries.append(entry)
  if not entries:
    raise ValueError(f"--prompts={path} holds no prompts")
  return entries


def read_dpg_prompts(directory: str) -> list[tuple[str, str]]:
  """(name, prompt) for every DIR/NAME.txt, sorted by name."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"--prompts={directory}: not a directory (DPG-Bench's prompts/ "
                            "folder of NAME.txt files)")
  out = []
  for path in sorted(glob.glob(os.path.join(directory, "*.txt"))):
    with open(path, encoding="utf-8") as f:
      prompt = f.read().strip()
    if not prompt:
      raise ValueError(f"{path}: empty prompt")
    out.append((os.path.splitext(os.path.basename(path))[0], prompt))
  if not out:
    raise ValueError(f"--prompts={directory} holds no .txt prompt files")
  return out


# --- sampling ----------------------------------------------------------------------------------

class Sampler:
  """Jitted batched sampling with a restored T2I run (the task's own `generate`)."""

  def __init__(self, task, model, mesh, batch_size: int):
    self.task, self.mesh, self.batch_size = task, mesh, batch_size
    graphdef, self.state = nnx.split(model)
    self.fn = jax.jit(lambda state, batch, rng: task.generate(nnx.merge(graphdef, state),
                                                               batch, rng))
    self.batch_sh = sharding.batch_sharding(mesh, 2)

  def __call__(self, prompts: list[str], key: jax.Array) -> np.ndarray:
    """uint8 (len(prompts), H, W, 3); batch b of the list uses noise key fold_in(key, b)."""
    from psvae_jax.tokenizers import tokenize

    out = []
    for b, start in enumerate(range(0, len(prompts), self.batch_size)):
      chunk = list(prompts[start:start + self.batch_size])
      valid = len(chunk)
      chunk += [chunk[-1]] * (self.batch_size - valid)  # one shape for every batch
      ids, mask = tokenize(self.task.tokenizer, chunk, self.task.config.model.max_text_len)
      with jax.set_mesh(self.mesh):
        batch = {"input_ids": jax.device_put(ids, self.batch_sh),
                 "attention_mask": jax.device_put(mask, self.batch_sh)}
        images = self.fn(self.state, batch, jax.random.fold_in(key, b))
      out.append(np.asarray(jax.device_get(images))[:valid])
    return np.concatenate(out)


def dpg_grid(images: np.ndarray) -> np.ndarray:
  """1-4 (H, W, 3) images tiled 2x2 without gutters (empty tiles white); one image alone."""
  if len(images) == 1:
    return images[0]
  h, w = images.shape[1:3]
  grid = np.full((2 * h, 2 * w, 3), 255, np.uint8)
  for k, img in enumerate(images):
    r, c = divmod(k, 2)
    grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
  return grid


def _write_geneval(out: str, name: str, metadata: dict, images: np.ndarray) -> None:
  from psvae_jax.metrics_log import image_grid
  folder = os.path.join(out, name)
  files.write_bytes(os.path.join(folder, "metadata.jsonl"), json.dumps(metadata).encode())
  for k, img in enumerate(images):
    files.write_png(os.path.join(folder, "samples", f"{k:04d}.png"), img)
  files.write_png(os.path.join(folder, "grid.png"), image_grid(images, columns=len(images)))


# --- the tool ----------------------------------------------------------------------------------

def sample_bench(workdir: str, bench: str, prompts: str, out: str, *,
                 samples_per_prompt: int = 4, batch_size: int = 0, sample_steps: int = 0,
                 cfg_scale: float = 0.0, seed: int = 0, max_prompts: int = 0,
                 use_ema: bool = True, mesh=None) -> dict[str, Any]:
  """Writes the benchmark's image layout under `out`; returns a summary (also written to
  out/sample_bench.json)."""
  started = time.perf_counter()
  if bench not in BENCHES:
    raise ValueError(f"--bench={bench!r}: expected one of {BENCHES}")
  if samples_per_prompt < 1:
    raise ValueError(f"--samples_per_prompt={samples_per_prompt} must be >= 1")
  if bench == "dpg" and samples_per_prompt > MAX_DPG_SAMPLES:
    raise ValueError(f"--samples_per_prompt={samples_per_prompt}: DPG-Bench's scorer reads at "
                     f"most {MAX_DPG_SAMPLES} images per prompt (a 2x2 grid)")
  if jax.process_count() > 1:
    raise NotImplementedError("sample_bench runs in one process (any number of local devices)")
  if bench == "geneval":
    items = [(f"{i:05d}", e["prompt"], e) for i, e in enumerate(read_geneval_prompts(prompts))]
  else:
    items = [(name, prompt, None) for name, prompt in read_dpg_prompts(prompts)]
  if max_prompts > 0:
    items = items[:max_prompts]
  mesh = default_mesh() if mesh is None else mesh
  dp = sharding.data_parallel_size(mesh)
  batch_size = batch_size or dp * max(1, -(-samples_per_prompt // dp))
  if batch_size < 1 or batch_size % dp:
    raise ValueError(f"--batch_size={batch_size} must be a positive multiple of the {dp} "
                     "devices the batch is split over")
  task, model, config, extras = load_run_model(workdir, use_ema=use_ema, mesh=mesh)
  if config.task != "t2i":
    raise ValueError(f"{workdir}: sample_bench samples text-to-image runs; this run is "
                     f"config.task={config.task!r}")
  if sample_steps:
    task.config.flow.sample_steps = int(sample_steps)
  if cfg_scale:
    task.config.flow.cfg_scale = float(cfg_scale)
  sampler = Sampler(task, model, mesh, batch_size)
  os.makedirs(out, exist_ok=True)

  def done(name: str) -> bool:
    if bench == "dpg":
      return os.path.isfile(os.path.join(out, f"{name}.png"))
    folder = os.path.join(out, name, "samples")
    return all(os.path.isfile(os.path.join(folder, f"{k:04d}.png"))
               for k in range(samples_per_prompt))

  # Fixed groups of whole prompts share batches; group g samples with key fold_in(seed, g),
  # so a restarted run (finished groups skipped) draws exactly the same images.
  per_group = max(1, batch_size // samples_per_prompt)
  written = skipped = 0
  for g, start in enumerate(range(0, len(items), per_group)):
    group = items[start:start + per_group]
    if all(done(name) for name, _, _ in group):
      skipped += len(group)
      continue
    rows = [prompt for _, prompt, _ in group for _ in range(samples_per_prompt)]
    images = sampler(rows, jax.random.fold_in(jax.random.key(seed), g))
    for j, (name, _, metadata) in enumerate(group):
      mine = images[j * samples_per_prompt:(j + 1) * samples_per_prompt]
      if bench == "dpg":
        files.write_png(os.path.join(out, f"{name}.png"), dpg_grid(mine))
      else:
        _write_geneval(out, name, metadata, mine)
      written += 1
  f = task.config.flow
  size = int(images.shape[1]) if written else int(config.model.autoencoder.pixel_decoder
                                                  .resolution)
  summary = {
      "workdir": workdir, "step": int(extras["step"]), "weights": extras["weights"],
      "bench": bench, "prompts": prompts, "out": out, "num_prompts": len(items),
      "written": written, "skipped_existing": skipped,
      "samples_per_prompt": samples_per_prompt, "image_size": size, "seed": seed,
      "sample_steps": int(f.sample_steps), "sample_shift": float(f.sample_shift),
      "cfg_scale": float(f.cfg_scale), "batch_size": batch_size,
      "score_with": (
          "python evaluation/evaluate_images.py OUT --outfile OUT/results.jsonl --model-path "
          "MODELS && python evaluation/summary_scores.py OUT/results.jsonl" if bench == "geneval"
          else f"compute_dpg_bench.py --image-root-path OUT --resolution {size} "
               f"--pic-num {samples_per_prompt}"),
      "elapsed_s": round(time.perf_counter() - started, 2),
  }
  files.write_json(os.path.join(out, "sample_bench.json"), summary)
  return summary


# --- command line ------------------------------------------------------------------------------

def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The T2I run's directory (with checkpoints/).", **f)
  flags.DEFINE_enum("bench", None, list(BENCHES), "Which benchmark's layout to write.", **f)
  flags.DEFINE_string("prompts", None, "GenEval: evaluation_metadata.jsonl; DPG-Bench: the "
                      "directory of NAME.txt prompts.", **f)
  flags.DEFINE_string("out", None, "Output directory.", **f)
  flags.DEFINE_integer("samples_per_prompt", 4, "Images per prompt (GenEval uses 4; DPG-Bench "
                       "1-4, tiled 2x2).", **f)
  flags.DEFINE_integer("batch_size", 0, "Images per batch (a multiple of the device count; "
                       "0 = samples_per_prompt rounded up to the device count).", **f)
  flags.DEFINE_integer("sample_steps", 0, "Euler steps (0 = the run's config.flow).", **f)
  flags.DEFINE_float("cfg_scale", 0.0, "Guidance scale (0 = the run's config.flow).", **f)
  flags.DEFINE_integer("seed", 0, "Sampling noise seed.", **f)
  flags.DEFINE_integer("max_prompts", 0, "Only the first N prompts (0 = all).", **f)
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.", **f)


def run_from_flags(flag_values=flags.FLAGS) -> dict[str, Any]:
  v = flag_values
  cli.require_flags(v, "workdir", "bench", "prompts", "out")
  return sample_bench(v.workdir, v.bench, v.prompts, v.out,
                      samples_per_prompt=v.samples_per_prompt, batch_size=v.batch_size,
                      sample_steps=v.sample_steps, cfg_scale=v.cfg_scale, seed=v.seed,
                      max_prompts=v.max_prompts, use_ema=v.use_ema)


main = cli.json_main(run_from_flags)


if __name__ == "__main__":
  define_flags()
  app.run(main)
