"""Compositional score of a text-to-image run on single-object synthetic-world prompts.

  python -m psvae_jax.tools.eval_t2i --workdir=T2I_RUN_DIR [--num_prompts=N] [--out=F.json] \
      [--random_init] [--batch_size=B] [--sample_steps=S] [--cfg_scale=G] [--sample_shift=S]
      [--seed=K]

Prompts name one object of the synthetic world ("a red circle", "an orange triangle", ...),
written by the world's own caption function, cycling through the 6 colours x 3 shapes. Each is
sampled once (its own noise) from the run's EMA generator with the run's sampler settings
(config.flow: Euler steps, inference shift, CFG scale; --sample_steps / --cfg_scale override),
decoded by the run's PS-VAE pixel decoder, and scored with the synthetic world's detector
(`psvae_jax.data.synthetic_score.detect_objects`): the largest palette-coloured blob is the
object; its colour and its shape (from how much of its box it fills) are compared with the
prompt's. GenEval's 'single object' check asks for the same thing (the named object is there).

JSON written to --out (default WORKDIR/eval_t2i.json, or eval_t2i_random_init.json):
  colour_acc  fraction of images whose largest object has the prompt's colour;
  shape_acc   ... the prompt's shape;
  score       ... both (the compositional score);
  n           number of prompts; plus one_object (fraction with exactly one object detected),
              nothing_found, per-class scores, the sampler settings, step, weights, the grid PNG
              of the first images (<out stem>_grid.png) and per-prompt detections.
--random_init replaces the generator with a freshly initialised one of the same config (the
baseline a trained run must beat); everything else (text encoder, decoder) is the run's own.
Images must be at least 64 px for the detector's shape guesses to be meaningful.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from psvae_jax import sharding
from psvae_jax.data import synthetic
from psvae_jax.data.synthetic_score import detect_objects
from psvae_jax.runs import default_mesh, load_run_model, run_config
from psvae_jax.tools import cli, files

MIN_SCORED_SIZE = 64  # the detector's lower bound (synthetic_score's module docstring)


# --- prompts and scoring ---------------------------------------------------------------------

def single_object_prompts(num_prompts: int) -> list[tuple[str, str, str]]:
  """(caption, colour, shape) for `num_prompts` prompts cycling through colour x shape."""
  if num_prompts < 1:
    raise ValueError(f"--num_prompts={num_prompts} must be >= 1")
  combos = [(c, s) for c in synthetic.COLOUR_NAMES for s in synthetic.SHAPES]
  out = []
  for i in range(num_prompts):
    colour, shape = combos[i % len(combos)]
    obj = synthetic.ShapeObject(shape, colour, 1, 1, 0.5, 0.5, 0.1)
    out.append((synthetic.caption(synthetic.Scene((obj,))), colour, shape))
  return out


def score_image(image: np.ndarray, colour: str, shape: str) -> dict[str, Any]:
  """Detector verdict for one uint8 image and the prompt's (colour, shape)."""
  dets = detect_objects(np.asarray(image))
  top = dets[0] if dets else None
  colour_ok = top is not None and top.colour == colour
  shape_ok = top is not None and top.shape == shape
  return {"colour_ok": colour_ok, "shape_ok": shape_ok, "ok": colour_ok and shape_ok,
          "num_objects": len(dets),
          "detected": None if top is None else {"colour": top.colour, "shape": top.shape,
                                                "area": top.area}}


def summarize(prompts, verdicts) -> dict[str, Any]:
  """Accuracies over prompts (and per colour-shape class)."""
  n = len(verdicts)
  mean = lambda key: float(np.mean([v[key] for v in verdicts]))
  per_class: dict[str, list[bool]] = {}
  for (caption, _, _), v in zip(prompts, verdicts):
    per_class.setdefault(caption, []).append(v["ok"])
  return {"colour_acc": mean("colour_ok"), "shape_acc": mean("shape_ok"), "score": mean("ok"),
          "n": n,
          "one_object": float(np.mean([v["num_objects"] == 1 for v in verdicts])),
          "nothing_found": float(np.mean([v["num_objects"] == 0 for v in verdicts])),
          "per_class_score": {k: float(np.mean(v)) for k, v in per_class.items()}}


# --- generation --------------------------------------------------------------------------------

def randomize_generator(task, model, seed: int) -> None:
  """Replaces model.generator's weights by a fresh initialisation of the same config, placed
  like the restored ones."""
  from psvae_jax.models import mmdit
  from psvae_jax.tasks import autoencoder_parts

  config = task.config
  old = nnx.state(model.generator)
  shardings = jax.tree.map(lambda x: x.sharding, old)

  def init():
    m = config.model
    fresh = mmdit.MMDiT(task.generator, scan_layers=m.scan_layers,
                        remat_policy=m.remat_policy or None,
                        attention_impl=config.attention_impl,
                        dtype=autoencoder_parts.compute_dtype(config), rngs=nnx.Rngs(seed))
    return nnx.state(fresh)

  nnx.update(model.generator, jax.jit(init, out_shardings=shardings)())


def generate_images(task, model, captions: list[str], *, batch_size: int, seed: int,
                    mesh) -> np.ndarray:
  """uint8 (N, H, W, 3) samples for `captions`, batch by batch (the last one padded)."""
  from psvae_jax.tokenizers import tokenize

  m = task.config.model
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, batch, rng: task.generate(nnx.merge(graphdef, state), batch, rng))
  batch_sh = sharding.batch_sharding(mesh, 2)
  key = jax.random.key(seed)
  out = []
  with jax.set_mesh(mesh):
    for index, start in enumerate(range(0, len(captions), batch_size)):
      chunk = list(captions[start:start + batch_size])
      valid = len(chunk)
      chunk += [chunk[-1]] * (batch_size - valid)  # one shape for every batch
      ids, mask = tokenize(task.tokenizer, chunk, m.max_text_len)
      batch = {"input_ids": jax.device_put(ids, batch_sh),
               "attention_mask": jax.device_put(mask, batch_sh)}
      images = fn(state, batch, jax.random.fold_in(key, index))
      out.append(np.asarray(jax.device_get(images))[:valid])
  return np.concatenate(out)


# --- the tool ----------------------------------------------------------------------------------

def evaluate_t2i(workdir: str, *, num_prompts: int = 180, batch_size: int = 0,
                 random_init: bool = False, sample_steps: int = 0, cfg_scale: float = 0.0,
                 sample_shift: float = 0.0, seed: int = 0, out: str = "", grid_images: int = 36,
                 use_ema: bool = True,
                 mesh=None) -> dict[str, Any]:
  """Samples and scores single-object prompts (see the module docstring); writes the JSON and
  the grid PNG and returns the JSON dict (plus 'json', its path)."""
  started = time.perf_counter()
  if jax.process_count() > 1:
    raise NotImplementedError("eval_t2i runs in one process (any number of local devices)")
  mesh = default_mesh() if mesh is None else mesh
  dp = sharding.data_parallel_size(mesh)
  batch_size = batch_size or max(dp, min(32, -(-num_prompts // dp) * dp))
  if batch_size < 1 or batch_size % dp:
    raise ValueError(f"--batch_size={batch_size} must be a positive multiple of the {dp} "
                     "devices the batch is split over")
  prompts = single_object_prompts(num_prompts)
  config = run_config(workdir)
  if config.task != "t2i":
    raise ValueError(f"{workdir}: eval_t2i evaluates text-to-image runs; this run is "
                     f"config.task={config.task!r}")
  size = int(config.model.autoencoder.pixel_decoder.resolution)
  if size < MIN_SCORED_SIZE:
    raise ValueError(f"{workdir}: the run generates {size} px images; the detector needs at "
                     f"least {MIN_SCORED_SIZE} px")
  task, model, config, extras = load_run_model(workdir, use_ema=use_ema, mesh=mesh)
  if sample_steps:
    task.config.flow.sample_steps = int(sample_steps)
  if cfg_scale:
    task.config.flow.cfg_scale = float(cfg_scale)
  if sample_shift:
    task.config.flow.sample_shift = float(sample_shift)
  if random_init:
    with jax.set_mesh(mesh):
      randomize_generator(task, model, seed)

  images = generate_images(task, model, [p[0] for p in prompts], batch_size=batch_size,
                           seed=seed, mesh=mesh)
  verdicts = [score_image(img, colour, shape)
              for img, (_, colour, shape) in zip(images, prompts)]
  f = task.config.flow
  result: dict[str, Any] = {
      **{k: v for k, v in summarize(prompts, verdicts).items() if k != "per_class_score"},
      "workdir": workdir, "step": int(extras["step"]),
      "weights": "random_init" if random_init else extras["weights"],
      "random_init": bool(random_init), "image_size": size, "seed": int(seed),
      "sample_steps": int(f.sample_steps), "sample_shift": float(f.sample_shift),
      "cfg_scale": float(f.cfg_scale), "batch_size": int(batch_size),
      "scoring": ("largest detected palette blob (synthetic_score.detect_objects) vs the "
                  "prompt's colour and shape; score = both right"),
  }
  result["per_class_score"] = summarize(prompts, verdicts)["per_class_score"]
  result["per_prompt"] = [{"prompt": p[0], **v} for p, v in zip(prompts, verdicts)]

  default_name = "eval_t2i_random_init.json" if random_init else "eval_t2i.json"
  out = out or os.path.join(workdir, default_name)
  from psvae_jax.metrics_log import image_grid
  n_grid = min(grid_images, len(images))
  result["grid"] = files.beside(out, "_grid.png")
  files.write_png(result["grid"], image_grid(
      images[:n_grid], columns=min(len(synthetic.SHAPES) * 3, n_grid)))
  result["elapsed_s"] = round(time.perf_counter() - started, 2)
  return files.write_result(out, result)


# --- command line ------------------------------------------------------------------------------

def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The T2I run's directory (with checkpoints/).", **f)
  flags.DEFINE_integer("num_prompts", 180, "Prompts (cycling through the 18 colour-shape "
                       "pairs), one image each.", **f)
  flags.DEFINE_integer("batch_size", 0, "Images per batch (a multiple of the device count); "
                       "0 = up to 32.", **f)
  flags.DEFINE_bool("random_init", False, "Score a freshly initialised generator of the same "
                    "config (the baseline).", **f)
  flags.DEFINE_integer("sample_steps", 0, "Euler steps (0 = the run's config.flow).", **f)
  flags.DEFINE_float("cfg_scale", 0.0, "Guidance scale (0 = the run's config.flow; 1 = none).",
                     **f)
  flags.DEFINE_float("sample_shift", 0.0, "Inference time shift (0 = the run's config.flow).",
                     **f)
  flags.DEFINE_integer("seed", 0, "Sampling noise (and the random generator's init).", **f)
  flags.DEFINE_string("out", "", "Output JSON (default WORKDIR/eval_t2i.json or "
                      "eval_t2i_random_init.json); the grid PNG goes next to it.", **f)
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.", **f)


def run_from_flags(flag_values=flags.FLAGS) -> dict[str, Any]:
  """Runs the evaluation with parsed flags; returns the JSON written."""
  v = flag_values
  cli.require_flags(v, "workdir")
  return evaluate_t2i(v.workdir, num_prompts=v.num_prompts, batch_size=v.batch_size,
                      random_init=v.random_init, sample_steps=v.sample_steps,
                      cfg_scale=v.cfg_scale, sample_shift=v.sample_shift, seed=v.seed, out=v.out,
                      use_ema=v.use_ema)


main = cli.json_main(run_from_flags, keys=("colour_acc", "shape_acc", "score", "n",
                                           "one_object", "weights", "step", "json"))


if __name__ == "__main__":
  define_flags()
  app.run(main)
