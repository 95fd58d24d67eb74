"""Text-to-image samples of a finished T2I (or edit) run for your own prompts.

  python -m psvae_jax.tools.sample --workdir=RUN --prompt="a red circle" --out=x.png
  python -m psvae_jax.tools.sample --workdir=RUN --prompts=prompts.txt --out=DIR
  common: [--num_samples=N] [--seed=K] [--sample_steps=S] [--cfg_scale=G] [--batch_size=B]
          [--use_ema]

--prompt writes one PNG file: the image, or with --num_samples=N > 1 the N images of the prompt
tiled in a near-square grid with 2 px white gutters (`metrics_log.image_grid`). --prompts reads
a text file with one prompt per line (blank lines skipped) and writes, into the directory
--out, one PNG per prompt named <index>_<slug>.png (index zero-padded, slug the prompt's
lowercase letters and digits joined by '-'), with --num_samples=N > 1 N numbered files
<index>_<slug>_<k>.png, plus DIR/prompts.jsonl: one JSON line per file with its prompt and the
sampling settings (seed, steps, shift, CFG scale, batch size, weights, step).

Images come from the run's EMA generator (--nouse_ema: the raw parameters) with the run's
sampler settings (config.flow: Euler steps, inference shift, CFG scale; --sample_steps /
--cfg_scale override them) at the run's image size, via `psvae_jax.api.Generator`: images are
sampled in batches of --batch_size in prompt order (each prompt's samples next to each other)
and batch b draws its noise from fold_in(key(seed), b), so the same flags give the same images.
Edit runs (configs/edit.py) sample text-to-image without a source image (EditTask.generate).
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags

from psvae_jax import sharding
from psvae_jax.tools import cli, files
from psvae_jax.runs import default_mesh, run_config

TASKS = ("t2i", "edit")  # runs whose `generate` samples captions without other inputs
MANIFEST = "prompts.jsonl"
MAX_SLUG = 48
MAX_BATCH = 32


# --- prompts and names -------------------------------------------------------------------------

def read_prompts(path: str) -> list[str]:
  """The prompts in a text file, one per line (surrounding whitespace and blank lines
  dropped), in file order."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--prompts={path}: no such file (a text file with one prompt "
                            "per line)")
  with open(path, encoding="utf-8") as f:
    prompts = [line.strip() for line in f]
  prompts = [p for p in prompts if p]
  if not prompts:
    raise ValueError(f"--prompts={path} holds no prompts (one prompt per line)")
  return prompts


def slug(prompt: str) -> str:
  """A filesystem-safe short name for a prompt: lowercase ASCII letters and digits joined by
  '-', at most MAX_SLUG characters ('prompt' when nothing is left)."""
  words = re.findall(r"[a-z0-9]+", prompt.lower())
  return "-".join(words)[:MAX_SLUG].strip("-") or "prompt"


def file_names(prompts: list[str], num_samples: int) -> list[list[str]]:
  """For each prompt, its num_samples PNG names: <index>_<slug>.png, or <index>_<slug>_<k>.png
  when num_samples > 1 (indices zero-padded to one width, so names sort in prompt order)."""
  width = max(4, len(str(len(prompts) - 1)))
  k_width = len(str(num_samples - 1))
  names = []
  for i, prompt in enumerate(prompts):
    stem = f"{i:0{width}d}_{slug(prompt)}"
    names.append([f"{stem}.png"] if num_samples == 1 else
                 [f"{stem}_{k:0{k_width}d}.png" for k in range(num_samples)])
  return names


# --- sampling ----------------------------------------------------------------------------------

def sample_images(workdir: str, prompts: list[str], *, num_samples: int = 1, seed: int = 0,
                  sample_steps: int = 0, cfg_scale: float = 0.0, batch_size: int = 0,
                  use_ema: bool = True, mesh=None) -> tuple[np.ndarray, dict[str, Any]]:
  """uint8 (len(prompts), num_samples, H, W, 3) samples of a T2I or edit run, and the settings
  they were drawn with (workdir, step, weights, image_size, seed, sample_steps, sample_shift,
  cfg_scale, batch_size)."""
  if num_samples < 1:
    raise ValueError(f"--num_samples={num_samples} must be >= 1")
  if jax.process_count() > 1:
    raise NotImplementedError("sample runs in one process (any number of local devices)")
  if not workdir:
    raise ValueError("--workdir is required (the run's directory, with checkpoints/)")
  if not workdir.startswith("gs://") and not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir}: no such directory")
  from psvae_jax import api

  task_name = run_config(workdir).get("task")
  if task_name not in TASKS:
    raise ValueError(f"{workdir}: sample draws text-to-image samples from t2i or edit runs; "
                     f"this run is config.task={task_name!r}")
  mesh = default_mesh() if mesh is None else mesh
  dp = sharding.data_parallel_size(mesh)
  rows = len(prompts) * num_samples
  batch_size = batch_size or max(dp, min(MAX_BATCH, -(-rows // dp) * dp))
  if batch_size < 1 or batch_size % dp:
    raise ValueError(f"--batch_size={batch_size} must be a positive multiple of the {dp} "
                     "devices the batch is split over")
  generator = api.Generator.load(workdir, ema=use_ema, mesh=mesh)
  used = generator.sampling_settings()
  used.update({k: v for k, v in (("sample_steps", int(sample_steps)),
                                 ("cfg_scale", float(cfg_scale))) if v})
  images = generator.generate(prompts, seed=seed, steps=used["sample_steps"],
                              cfg_scale=used["cfg_scale"], num_images=num_samples,
                              batch_size=batch_size)
  settings = {"workdir": workdir, "task": task_name, "step": generator.step,
              "weights": generator.weights, "image_size": int(images.shape[1]),
              "seed": int(seed), **used, "batch_size": int(batch_size)}
  return images.reshape(len(prompts), num_samples, *images.shape[1:]), settings


# --- the two modes -----------------------------------------------------------------------------

def sample_prompt(workdir: str, prompt: str, out: str, *, num_samples: int = 1,
                  **kwargs) -> dict[str, Any]:
  """Writes one PNG to `out` (the num_samples images tiled when more than one); returns the
  settings with 'prompt', 'out', 'num_samples' and 'elapsed_s'. kwargs: `sample_images`'."""
  from psvae_jax.metrics_log import image_grid

  started = time.perf_counter()
  if not prompt.strip():
    raise ValueError("--prompt is empty")
  if not out:
    raise ValueError("--out is required (the PNG file to write)")
  if os.path.isdir(out):
    raise IsADirectoryError(f"--out={out} is a directory; --prompt writes one PNG file (give "
                            "a file name, or use --prompts=FILE to fill a directory)")
  images, settings = sample_images(workdir, [prompt], num_samples=num_samples, **kwargs)
  mine = images[0]
  files.write_png(out, mine[0] if num_samples == 1 else image_grid(mine))
  return {"prompt": prompt, "out": out, "num_samples": num_samples, **settings,
          "elapsed_s": round(time.perf_counter() - started, 2)}


def sample_prompts_file(workdir: str, prompts_file: str, out: str, *, num_samples: int = 1,
                        **kwargs) -> dict[str, Any]:
  """Writes one PNG per prompt and sample into the directory `out` and the manifest
  out/prompts.jsonl (see the module docstring); returns the settings with 'prompts', 'out',
  'manifest', 'num_prompts', 'num_samples', 'files' and 'elapsed_s'."""
  started = time.perf_counter()
  if not out:
    raise ValueError("--out is required (the directory to write the PNGs into)")
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f"--out={out} is an existing file; --prompts writes a directory of "
                          "PNGs (give a directory path)")
  prompts = read_prompts(prompts_file)
  if num_samples < 1:
    raise ValueError(f"--num_samples={num_samples} must be >= 1")
  names = file_names(prompts, num_samples)
  images, settings = sample_images(workdir, prompts, num_samples=num_samples, **kwargs)
  os.makedirs(out, exist_ok=True)
  lines = []
  for index, (prompt, prompt_names, mine) in enumerate(zip(prompts, names, images)):
    for k, (name, image) in enumerate(zip(prompt_names, mine)):
      files.write_png(os.path.join(out, name), image)
      lines.append(json.dumps({"file": name, "prompt": prompt, "index": index, "sample": k,
                               **settings}))
  manifest = os.path.join(out, MANIFEST)
  files.write_bytes(manifest, ("\n".join(lines) + "\n").encode())
  return {"prompts": prompts_file, "out": out, "manifest": manifest,
          "num_prompts": len(prompts), "num_samples": num_samples, "files": len(lines),
          **settings, "elapsed_s": round(time.perf_counter() - started, 2)}


# --- command line ------------------------------------------------------------------------------

def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The T2I (or edit) run's directory (with "
                      "checkpoints/).", **f)
  flags.DEFINE_string("prompt", None, "One prompt; --out is the PNG file to write.", **f)
  flags.DEFINE_string("prompts", None, "A text file with one prompt per line; --out is the "
                      "directory for the PNGs and prompts.jsonl.", **f)
  flags.DEFINE_string("out", None, "Output PNG (--prompt) or directory (--prompts).", **f)
  flags.DEFINE_integer("num_samples", 1, "Images per prompt (--prompt: tiled into one PNG; "
                       "--prompts: numbered files).", **f)
  flags.DEFINE_integer("seed", 0, "Sampling noise seed.", **f)
  flags.DEFINE_integer("sample_steps", 0, "Euler steps (0 = the run's config.flow).", **f)
  flags.DEFINE_float("cfg_scale", 0.0, "Guidance scale (0 = the run's config.flow; 1 = none).",
                     **f)
  flags.DEFINE_integer("batch_size", 0, "Images per batch (a multiple of the device count); "
                       f"0 = all images, up to {MAX_BATCH}, rounded up to the device count.",
                       **f)
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.", **f)


def run_from_flags(flag_values=flags.FLAGS, mesh=None) -> dict[str, Any]:
  """Runs the mode the flags ask for (--prompt or --prompts); returns its summary."""
  v = flag_values
  if not v.workdir:
    raise app.UsageError("--workdir is required (the run's directory, with checkpoints/)")
  if (v.prompt is None) == (v.prompts is None):
    raise app.UsageError("give exactly one of --prompt=TEXT (one PNG) and --prompts=FILE (a "
                         "directory of PNGs)" + (", not both" if v.prompt is not None else ""))
  if not v.out:
    raise app.UsageError("--out is required (--prompt: the PNG file; --prompts: the "
                         "directory)")
  kwargs = dict(num_samples=v.num_samples, seed=v.seed, sample_steps=v.sample_steps,
                cfg_scale=v.cfg_scale, batch_size=v.batch_size, use_ema=v.use_ema, mesh=mesh)
  if v.prompt is not None:
    return sample_prompt(v.workdir, v.prompt, v.out, **kwargs)
  return sample_prompts_file(v.workdir, v.prompts, v.out, **kwargs)


main = cli.json_main(run_from_flags)


if __name__ == "__main__":
  define_flags()
  app.run(main)
