"""Edits one image with a finished edit run (configs/edit.py).

  python -m psvae_jax.tools.edit --workdir=DIR --image=in.png --instruction="make it blue" \
      --out=out.png [--fit=squash|crop] [--seed=0] [--cfg_scale=S] [--image_cfg_scale=S] \
      [--steps=N]

The image is brought to the run's square image size (config.data.image_size) and edited with
the run's EMA generator and its sampling settings (config.flow: Euler steps, text scale
cfg_scale, image scale image_cfg_scale; flags override them). --fit=squash (default) resizes
the whole image to the square (aspect ratio not kept) and the edited image back to the input's
size; --fit=crop edits the centred square crop and writes it at the run's size. An unreadable or
missing image is an error naming the file and the reason.
"""
from __future__ import annotations

import json

import numpy as np
from absl import app, flags
from PIL import Image

from psvae_jax.data.decode import load_rgb
from psvae_jax.data.errors import BadImage
from psvae_jax.data.preprocess import resize_center_crop
from psvae_jax.tools import cli, files
from psvae_jax.errors import UserError

FITS = ("squash", "crop")
MAX_IMAGE_PIXELS = 8192 * 8192


class InputError(UserError, ValueError):
  """An input file (image, benchmark) cannot be used; the message names it and why."""


def load_edit_run(workdir: str):
  """(task, model, config, extras) of an edit run's latest checkpoint (EMA weights); extras
  with 'step' and 'weights', opened through `psvae_jax.api.Editor`."""
  from psvae_jax import api
  from psvae_jax.runs import run_config

  task_name = run_config(workdir).get("task")
  if task_name != "edit":
    raise InputError(f"{workdir} is a {task_name!r} run; editing needs an edit run "
                     "(configs/edit.py)")
  editor = api.Editor.load(workdir)
  return editor.task, editor.model, editor.config, {"step": editor.step,
                                                     "weights": editor.weights}


def decode_input_image(data: bytes, what: str) -> Image.Image:
  """RGB PIL image of encoded bytes; InputError naming `what` when it does not decode."""
  try:
    return load_rgb(data, max_pixels=MAX_IMAGE_PIXELS)
  except BadImage as e:
    raise InputError(f"{what} is not a readable image: {e}") from None


def read_image(path: str) -> Image.Image:
  """The RGB image in the file `path`; InputError naming the file when it cannot be used."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise InputError(f"cannot read the image file {path!r}: {e.strerror or e}") from None
  return decode_input_image(data, f"{path!r}")


def fit_image(image: Image.Image, size: int, fit: str) -> np.ndarray:
  """uint8 (size, size, 3): the whole image resized (squash) or its centred square (crop)."""
  if fit == "squash":
    return np.asarray(image.resize((size, size), Image.BICUBIC, reducing_gap=3.0))
  if fit == "crop":
    return resize_center_crop(image, size)
  raise ValueError(f"fit {fit!r} not in {FITS}")


def unfit_image(edited: np.ndarray, original_size: tuple[int, int], fit: str) -> Image.Image:
  """The edited square back at the input's (width, height) (squash) or as is (crop)."""
  image = Image.fromarray(np.asarray(edited))
  if fit == "squash" and image.size != tuple(original_size):
    return image.resize(tuple(original_size), Image.BICUBIC)
  return image


def edit_pil_images(task, model, images, instructions, *, fit: str = "squash", seed: int = 0,
                    batch_size: int = 8, **sampling) -> list[Image.Image]:
  """Edits PIL images (any sizes) with `instructions`; returns PIL images (see --fit)."""
  size = task.config.data.image_size
  squares = np.stack([fit_image(im, size, fit) for im in images])
  edited = task.edit(model, squares, instructions, seed=seed, batch_size=batch_size, **sampling)
  return [unfit_image(e, im.size, fit) for e, im in zip(edited, images)]


def sampling_overrides(cfg_scale: float | None, image_cfg_scale: float | None,
                       steps: int | None) -> dict:
  """`EditTask.edit` keyword arguments for the flags a user set."""
  return dict(text_scale=cfg_scale, image_scale=image_cfg_scale, num_steps=steps)


def edit_file(workdir: str, image: str, instruction: str, out: str, *, fit: str = "squash",
              seed: int = 0, **sampling) -> dict:
  """Edits the image file `image` with `instruction` and writes `out` (PNG); returns a summary."""
  if fit not in FITS:
    raise InputError(f"--fit={fit!r}: expected one of {FITS}")
  source = read_image(image)  # before loading the run: a bad input fails fast
  task, model, config, extras = load_edit_run(workdir)
  (edited,) = edit_pil_images(task, model, [source], [instruction], fit=fit, seed=seed,
                              batch_size=1, **sampling)
  files.write_png(out, np.asarray(edited))
  return {"image": image, "instruction": instruction, "out": out, "size": list(edited.size),
          "fit": fit, "model_size": config.data.image_size, "seed": seed,
          "step": extras["step"], **sampling_used(config, sampling)}


def sampling_used(config, sampling: dict) -> dict:
  """The guidance scales and steps in effect: the overrides, else the run's config.flow."""
  f = config.flow
  pick = lambda key, default: default if sampling.get(key) is None else sampling[key]
  return {"cfg_scale": float(pick("text_scale", f.cfg_scale)),
          "image_cfg_scale": float(pick("image_scale", f.image_cfg_scale)),
          "steps": int(pick("num_steps", f.sample_steps))}


def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The edit run's directory (with checkpoints/).", **f)
  flags.DEFINE_string("image", None, "The image file to edit.", **f)
  flags.DEFINE_string("instruction", None, "The edit instruction.", **f)
  flags.DEFINE_string("out", None, "Output PNG.", **f)
  flags.DEFINE_enum("fit", "squash", list(FITS), "squash: whole image, output at the input's "
                    "size; crop: centred square, output at the run's size.", **f)
  define_sampling_flags(flag_values, seed_help="Noise seed.")


def define_sampling_flags(flag_values=flags.FLAGS, *, seed_help: str) -> None:
  """--seed, --cfg_scale, --image_cfg_scale and --steps, shared by the editing tools (the last
  three default to the run's config.flow; see `sampling_overrides`)."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_integer("seed", 0, seed_help, **f)
  flags.DEFINE_float("cfg_scale", None, "Text guidance scale (default: the run's).", **f)
  flags.DEFINE_float("image_cfg_scale", None, "Image guidance scale (default: the run's).", **f)
  flags.DEFINE_integer("steps", None, "Euler steps (default: the run's).", **f)


def main(argv):
  cli.no_arguments(argv)
  v = flags.FLAGS
  cli.require_flags(v, "workdir", "image", "instruction", "out")
  try:
    result = edit_file(v.workdir, v.image, v.instruction, v.out, fit=v.fit, seed=v.seed,
                       **sampling_overrides(v.cfg_scale, v.image_cfg_scale, v.steps))
  except InputError as e:
    raise app.UsageError(str(e)) from None
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
