"""Measured edit success of a finished edit run on the synthetic edit world.

  python -m psvae_jax.tools.eval_edit --workdir=DIR [--num=N] [--random_init] \
      [--psnr_threshold=DB] [--batch_size=B] [--seed=0] [--cfg_scale=S] [--image_cfg_scale=S] \
      [--steps=N] [--out=DIR/eval_edit.json]

Takes the first N held-out edits of each kind (recolour, add, remove, move) of the synthetic
edit world (indices from config.data.synthetic_size on, never trained on) at the run's image
size, edits each source with its instruction (EMA generator, the run's sampling settings unless
overridden) and scores the result against the known scenes:
  followed   every grid cell the edit touches shows what the target scene has there, read off
             the image by the synthetic scorer (psvae_jax.data.synthetic_score: palette colours
             of connected components, placed in the cell of their centre): the target object's
             colour is found in its cell, and a colour the edit removes from a cell (recoloured,
             removed or moved-away object) is not found there any more. Shapes are not checked:
             the scorer's shape guess is unreliable through a lossy latent at 64 px.
  preserved  PSNR between the edited image and the source over the pixels outside the edited
             region (the edit mask, dilated by max(1, size // 32) px for the decoder's blur) is
             >= --psnr_threshold dB.
  success    followed and preserved.
Rows of the table (rates per edit kind and overall):
  trained          the run's generator;
  source_identity  the unedited source as the "edit" (preserves everything, follows nothing);
  reconstruction   the source through the PS-VAE (encode + decode, no generator): what the
                   latent alone costs the preservation PSNR;
  random_init      (--random_init) the generator re-initialised at random (MMDiT init, seed
                   --seed), every other part the run's.
Writes the JSON (default WORKDIR/eval_edit.json) and a PNG of (source | edited | target)
strips next to it (<stem>_grid.png), prints the table.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from scipy import ndimage

from psvae_jax.data import synthetic
from psvae_jax.data.synthetic_score import detect_objects
from psvae_jax.tools import cli, files
from psvae_jax.tools import edit as edit_tool
from psvae_jax.tools.eval_t2i import randomize_generator

ROWS = ("trained", "source_identity", "reconstruction", "random_init")
DEFAULT_PSNR_THRESHOLD = 25.0  # dB; the toy PS-VAE itself reconstructs this world at ~30 dB
PSNR_CAP = 99.0  # identical pixels (infinite PSNR) are reported as this
_MAX_SCAN = 1000  # held-out indices scanned per requested example


# --- the edits -----------------------------------------------------------------------------

def held_out_edits(num_per_kind: int, size: int, start: int, kinds=synthetic.EDIT_KINDS
                   ) -> list[dict]:
  """The first `num_per_kind` edits of each kind at indices start, start + 1, ... (the edit
  world's own sampling, as `synthetic.edits_example`), with their scenes and masks."""
  counts = {k: 0 for k in kinds}
  out = []
  for index in range(start, start + _MAX_SCAN * max(1, num_per_kind) * len(kinds)):
    if all(n >= num_per_kind for n in counts.values()):
      break
    rng = synthetic.example_rng(index, 1)
    scene = synthetic.sample_scene(rng)
    edit = synthetic.sample_edit(rng, scene)
    if edit.kind not in counts or counts[edit.kind] >= num_per_kind:
      continue
    counts[edit.kind] += 1
    out.append({"index": index, "kind": edit.kind, "instruction": edit.instruction,
                "source_scene": scene, "target_scene": edit.target,
                "source": synthetic.render(scene, size),
                "target": synthetic.render(edit.target, size), "mask": edit.mask_fn(size)})
  short = {k: n for k, n in counts.items() if n < num_per_kind}
  if short:
    raise ValueError(f"found only {short} held-out edits of these kinds")
  return out


# --- scoring -------------------------------------------------------------------------------

def cell_colours(image: np.ndarray) -> dict[tuple[int, int], set[str]]:
  """Palette colours detected per grid cell (row, col) of a uint8 image."""
  cells: dict[tuple[int, int], set[str]] = {}
  for d in detect_objects(image):
    cells.setdefault((d.row, d.col), set()).add(d.colour)
  return cells


def edit_followed(image: np.ndarray, source: synthetic.Scene, target: synthetic.Scene) -> bool:
  """Every cell the edit changes shows the target's object colour and no longer the colour the
  edit takes away (see the module docstring)."""
  before = {(o.row, o.col): o.colour for o in source.objects}
  after = {(o.row, o.col): o.colour for o in target.objects}
  seen = cell_colours(image)
  for cell in set(before) | set(after):
    if before.get(cell) == after.get(cell):
      continue
    colours = seen.get(cell, set())
    if cell in after and after[cell] not in colours:
      return False
    if cell in before and before[cell] != after.get(cell) and before[cell] in colours:
      return False
  return True


def psnr_outside(image: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
  """PSNR (dB, uint8 range) of `image` vs `source` over the pixels outside the dilated mask."""
  dilate = max(1, source.shape[0] // 32)
  keep = ~ndimage.binary_dilation(mask, iterations=dilate)
  if not keep.any():
    return PSNR_CAP
  diff = image.astype(np.float64)[keep] - source.astype(np.float64)[keep]
  mse = float(np.mean(np.square(diff)))
  return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * np.log10(255.0 ** 2 / mse))


def score(edits: list[dict], images: np.ndarray, threshold: float) -> dict:
  """Per kind and overall: success / followed / preserved rates, mean PSNR outside, n."""
  per = []
  for e, image in zip(edits, images):
    followed = edit_followed(image, e["source_scene"], e["target_scene"])
    psnr = psnr_outside(image, e["source"], e["mask"])
    per.append((e["kind"], followed, psnr >= threshold, psnr))
  table = {}
  for kind in (*synthetic.EDIT_KINDS, "all"):
    rows = [p for p in per if kind in ("all", p[0])]
    if not rows:
      continue
    table[kind] = {"success": float(np.mean([f and k for _, f, k, _ in rows])),
                   "followed": float(np.mean([f for _, f, _, _ in rows])),
                   "preserved": float(np.mean([k for _, _, k, _ in rows])),
                   "psnr_outside": float(np.mean([p for *_, p in rows])), "n": len(rows)}
  return table


# --- images of each row --------------------------------------------------------------------

def reconstruct(task, model, images: np.ndarray, batch_size: int) -> np.ndarray:
  """Sources through the PS-VAE: normalised latents, denormalised, decoded."""
  from psvae_jax.tasks import t2i
  from psvae_jax.tasks.autoencoder import unit_range_to_uint8

  graphdef, state = nnx.split(model)
  ae = task.config.model.autoencoder

  @jax.jit
  def run(state, images):
    m = nnx.merge(graphdef, state)
    latents = t2i.image_latents(m, images, ae)
    return unit_range_to_uint8(m.pixel_decoder(m.latent_norm.denormalize(latents)))

  return np.concatenate([np.asarray(run(state, images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def _check_size(images: np.ndarray, size: int, what: str) -> None:
  if images.shape[1:3] != (size, size):
    raise ValueError(f"{what} are {images.shape[1:3]} px but the run's images are {size} px: "
                     "the pixel decoder's resolution must equal config.data.image_size")


# --- the evaluation ------------------------------------------------------------------------

def evaluate_edits(workdir: str, *, num: int = 50, random_init: bool = False,
                   psnr_threshold: float = DEFAULT_PSNR_THRESHOLD, batch_size: int = 8,
                   seed: int = 0, out: str = "", grid_per_kind: int = 2, **sampling) -> dict:
  """Runs the evaluation (see the module docstring); returns the JSON written to `out`."""
  start = time.time()
  if num < 1:
    raise ValueError(f"--num must be >= 1, got {num}")
  task, model, config, extras = edit_tool.load_edit_run(workdir)
  size = config.data.image_size
  edits = held_out_edits(num, size, int(config.data.synthetic_size))
  sources = np.stack([e["source"] for e in edits])
  instructions = [e["instruction"] for e in edits]
  images = {"source_identity": sources}
  timings = {}
  t0 = time.time()
  images["trained"] = task.edit(model, sources, instructions, seed=seed, batch_size=batch_size,
                                **sampling)
  timings["trained"] = time.time() - t0
  images["reconstruction"] = reconstruct(task, model, sources, batch_size)
  if random_init:
    randomize_generator(task, model, seed)
    t0 = time.time()
    images["random_init"] = task.edit(model, sources, instructions, seed=seed,
                                      batch_size=batch_size, **sampling)
    timings["random_init"] = time.time() - t0
  for name, batch in images.items():
    _check_size(batch, size, f"{name} images")
  rows = {name: score(edits, images[name], psnr_threshold) for name in ROWS if name in images}
  result = {"workdir": workdir, "step": extras["step"], "num_per_kind": num, "image_size": size,
            "psnr_threshold": psnr_threshold, "held_out_start": int(config.data.synthetic_size),
            **edit_tool.sampling_used(config, sampling), "seed": seed, "rows": rows,
            "edit_seconds": {k: round(v, 1) for k, v in timings.items()},
            "seconds": round(time.time() - start, 1)}
  out = out or os.path.join(workdir, "eval_edit.json")
  files.write_json(out, result)
  _write_grid(edits, images, files.beside(out, "_grid.png"), grid_per_kind)
  return result


def _write_grid(edits, images, path: str, per_kind: int) -> None:
  """Rows of (source | trained | [random_init |] target) for a few edits of each kind."""
  from psvae_jax.metrics_log import image_grid

  picked = []
  for kind in synthetic.EDIT_KINDS:
    picked += [i for i, e in enumerate(edits) if e["kind"] == kind][:per_kind]
  columns = ["source_identity", "trained"] + (["random_init"] if "random_init" in images else [])
  strips = []
  for i in picked:
    strips += [images[c][i] for c in columns] + [edits[i]["target"]]
  files.write_png(path, image_grid(np.stack(strips), columns=len(columns) + 1))


def format_table(result: dict) -> str:
  """The success rates as a text table (rows x edit kinds)."""
  kinds = (*synthetic.EDIT_KINDS, "all")
  lines = [f"{'success':<16}" + "".join(f"{k:>10}" for k in kinds)]
  for name, table in result["rows"].items():
    lines.append(f"{name:<16}" + "".join(
        f"{table[k]['success']:>10.2f}" if k in table else f"{'-':>10}" for k in kinds))
  return "\n".join(lines)


def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The edit run's directory (with checkpoints/).", **f)
  flags.DEFINE_integer("num", 50, "Held-out edits per edit kind.", **f)
  flags.DEFINE_bool("random_init", False, "Add the random-init generator row.", **f)
  flags.DEFINE_float("psnr_threshold", DEFAULT_PSNR_THRESHOLD, "Preservation threshold (dB) "
                     "on the PSNR outside the edited region.", **f)
  flags.DEFINE_integer("batch_size", 8, "Edits per batch.", **f)
  edit_tool.define_sampling_flags(flag_values,
                                  seed_help="Noise seed (and the random-init seed).")
  flags.DEFINE_string("out", "", "Output JSON (default WORKDIR/eval_edit.json).", **f)


def main(argv):
  cli.no_arguments(argv)
  v = flags.FLAGS
  cli.require_flags(v, "workdir")
  try:
    result = evaluate_edits(v.workdir, num=v.num, random_init=v.random_init,
                            psnr_threshold=v.psnr_threshold, batch_size=v.batch_size,
                            seed=v.seed, out=v.out,
                            **edit_tool.sampling_overrides(v.cfg_scale, v.image_cfg_scale,
                                                           v.steps))
  except edit_tool.InputError as e:
    raise app.UsageError(str(e)) from None
  print(json.dumps(result, indent=2))
  print(format_table(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)
