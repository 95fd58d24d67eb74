"""The Python API over finished runs: encode, decode and reconstruct images with a PS-VAE, draw
text-to-image samples, edit images. No command-line flags are involved.

  from psvae_jax import api
  ae = api.Autoencoder.load("/tmp/psvae/pipeline/psvae")       # a workdir (latest step, EMA)
  latents = ae.encode(images)        # uint8 (N, H, W, 3) or PIL images -> float32 (N, h, w, C)
  recon = ae.decode(latents)         # -> uint8 (N, S, S, 3) at the run's image size
  gen = api.Generator.load("/tmp/psvae/pipeline/t2i")
  samples = gen.generate(["a red circle"], seed=0, num_images=4)   # uint8 (4, S, S, 3)

Images come in as one uint8 NHWC array, one uint8 HWC array, one PIL image or a sequence of
PIL images / HWC arrays; an image whose size is not the run's square image size
(config.data.image_size) is resized to it (bicubic, aspect ratio not kept). Any number of
images: they run in batches split over the devices present (the last batch padded, the padding
dropped). Weights are the run's EMA weights when it kept them (`ema=False`: the raw ones).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from psvae_jax import sharding

MAX_BATCH = 32  # images per device batch at most, rounded to the data-parallel size
AUTOENCODER_TASKS = ("svae", "psvae")
GENERATOR_TASKS = ("t2i", "edit")


def _open_run(path: str, step: int | None, ema: bool, mesh):
  """(task, model, config, extras, mesh) of the run at `path` (a workdir, its checkpoints/
  directory or one step directory checkpoints/<step>) placed on `mesh` (default: every device
  on 'data'); extras as `runs.load_run_model` gives them ('step', 'weights', ...).

  Every run the API opens goes through here."""
  from psvae_jax.runs import default_mesh, load_run_model

  path = os.fspath(path)
  head, tail = os.path.split(path.rstrip("/"))
  if tail.isdigit() and os.path.basename(head) == "checkpoints":
    if step is not None and int(step) != int(tail):
      raise ValueError(f"{path} is step {tail} but step={step} was asked for")
    path, step = head, int(tail)
  if not path.startswith("gs://") and not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such run directory (a workdir with checkpoints/)")
  mesh = default_mesh() if mesh is None else mesh
  task, model, config, extras = load_run_model(path, use_ema=ema, mesh=mesh, step=step)
  return task, model, config, extras, mesh


def _check_task(config, allowed: tuple[str, ...], path: str, what: str) -> None:
  if config.task not in allowed:
    raise ValueError(f"{path} is a {config.task!r} run; {what} needs a run of task "
                     f"{' or '.join(repr(a) for a in allowed)}")


# --- images in and out -----------------------------------------------------------------------

def _is_pil(x) -> bool:
  return type(x).__module__.startswith("PIL.") and hasattr(x, "convert")


def as_uint8_images(images, size: int) -> tuple[np.ndarray, list[tuple[int, int]], bool]:
  """(uint8 (N, size, size, 3), each input's (width, height), whether the input was PIL).

  Accepts a uint8 NHWC / HWC array, a PIL image, or a sequence of PIL images / HWC arrays."""
  from PIL import Image

  pil = _is_pil(images) or (isinstance(images, (list, tuple)) and bool(images)
                            and all(_is_pil(x) for x in images))
  if _is_pil(images):
    images = [images]
  if isinstance(images, np.ndarray) and images.ndim == 3:
    images = images[None]
  if isinstance(images, np.ndarray):
    items = list(images) if images.ndim == 4 else None
    if items is None:
      raise ValueError(f"images must be NHWC or HWC, got an array of shape {images.shape}")
  elif isinstance(images, (list, tuple)):
    items = list(images)
  else:
    raise TypeError(f"images must be a uint8 array, a PIL image or a sequence of them, got "
                    f"{type(images).__name__}")
  if not items:
    raise ValueError("no images given")
  out, sizes = [], []
  for i, item in enumerate(items):
    if _is_pil(item):
      item = np.asarray(item.convert("RGB"))
    item = np.asarray(item)
    if item.dtype != np.uint8 or item.ndim != 3 or item.shape[-1] != 3:
      raise ValueError(f"image {i}: expected uint8 (H, W, 3), got {item.dtype} {item.shape}")
    sizes.append((item.shape[1], item.shape[0]))
    if item.shape[:2] != (size, size):
      item = np.asarray(Image.fromarray(item).resize((size, size), Image.BICUBIC))
    out.append(item)
  return np.stack(out), sizes, pil


def _batch_size(n: int, dp: int, batch_size: int | None) -> int:
  if batch_size:
    if batch_size % dp:
      raise ValueError(f"batch_size={batch_size} must be a multiple of the {dp} devices the "
                       "batch is split over")
    return int(batch_size)
  return max(dp, min(MAX_BATCH, -(-n // dp) * dp))


def _run_batched(fn, state, inputs: np.ndarray, mesh, batch_size: int) -> np.ndarray:
  """fn(state, batch) over `inputs` in padded batches sharded over the mesh's data axes."""
  batch_sh = sharding.batch_sharding(mesh, inputs.ndim)
  out = []
  with jax.set_mesh(mesh):
    for start in range(0, len(inputs), batch_size):
      chunk = inputs[start:start + batch_size]
      valid = len(chunk)
      if valid < batch_size:  # one shape for every batch: pad with copies, drop after
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
      result = fn(state, jax.device_put(chunk, batch_sh))
      out.append(np.asarray(jax.device_get(result))[:valid])
  return np.concatenate(out)


class _Run:
  """A finished run opened on a mesh: its task, model, stored config, step and weights."""

  TASKS: tuple[str, ...] = ()

  def __init__(self, task, model, config, extras, mesh):
    self.task, self.model, self.config, self.mesh = task, model, config, mesh
    self.step = int(extras["step"])
    self.weights = extras["weights"]
    self.latent_stats = extras.get("latent_stats")

  @classmethod
  def load(cls, path: str, step: int | None = None, ema: bool = True, *, mesh=None):
    """Opens a run of the class's tasks: a workdir, its checkpoints/ or checkpoints/<step>;
    EMA weights unless ema=False; on `mesh` (default: every device on 'data')."""
    task, model, config, extras, mesh = _open_run(path, step, ema, mesh)
    _check_task(config, cls.TASKS, str(path), cls.__name__)
    return cls(task, model, config, extras, mesh)


# --- the autoencoder -------------------------------------------------------------------------

class Autoencoder(_Run):
  """A trained S-VAE / PS-VAE: images <-> latents, and the encoder's semantic features.

  Example (any S-VAE or PS-VAE workdir, e.g. the smoke pipeline's):
    >>> import numpy as np
    >>> from psvae_jax import api
    >>> ae = api.Autoencoder.load("/tmp/psvae/pipeline/psvae")
    >>> images = np.zeros((3, 64, 64, 3), np.uint8)
    >>> z = ae.encode(images)                  # (3, 4, 4, 16) posterior mean, float32
    >>> ae.decode(z).shape, ae.features(images).shape
    ((3, 64, 64, 3), (3, 4, 4, 64))
  """

  TASKS = AUTOENCODER_TASKS

  def __init__(self, task, model, config, extras, mesh):
    super().__init__(task, model, config, extras, mesh)
    self._graphdef, self._state = nnx.split(model)
    self._fns: dict[str, Any] = {}

  @property
  def image_size(self) -> int:
    return int(self.config.data.image_size)

  def _fn(self, name: str):
    if name not in self._fns:
      from psvae_jax.tasks import autoencoder_parts
      from psvae_jax.tasks.autoencoder import unit_range_to_uint8

      graphdef, m = self._graphdef, self.config.model

      def features(state, images):
        model = nnx.merge(graphdef, state)
        return autoencoder_parts.encoder_features(model.encoder, images, m)

      def encode(state, images):
        model = nnx.merge(graphdef, state)
        return model.svae.encode(features(state, images)).mean

      def decode(state, z):
        return unit_range_to_uint8(nnx.merge(graphdef, state).pixel_decoder(z))

      fns = {"features": features, "encode": encode, "decode": decode,
             "reconstruct": lambda state, images: decode(state, encode(state, images))}
      self._fns[name] = jax.jit(fns[name])
    return self._fns[name]

  def _images_call(self, name: str, images, batch_size: int | None) -> np.ndarray:
    batch, _, _ = as_uint8_images(images, self.image_size)
    dp = sharding.data_parallel_size(self.mesh)
    return _run_batched(self._fn(name), self._state, batch, self.mesh,
                        _batch_size(len(batch), dp, batch_size))

  def encode(self, images, *, normalize: bool = False, batch_size: int | None = None
             ) -> np.ndarray:
    """float32 (N, h, w, C) posterior-mean latents; normalize=True applies the run's
    per-channel latent statistics ((z - mean) / std, the generators' latent space)."""
    z = self._images_call("encode", images, batch_size)
    if normalize:
      mean, std = self._stats()
      z = (z - mean) / std
    return z

  def decode(self, latents, *, normalized: bool = False, batch_size: int | None = None
             ) -> np.ndarray:
    """uint8 (N, S, S, 3) images of float latents (N, h, w, C); normalized=True first undoes
    the latent statistics (for latents from `encode(normalize=True)` or a generator)."""
    z = np.asarray(latents, np.float32)
    channels = int(self.config.model.latent_channels)
    if z.ndim == 3:
      z = z[None]
    if z.ndim != 4 or z.shape[-1] != channels:
      raise ValueError(f"latents must be (N, h, w, {channels}), got shape {z.shape}")
    if normalized:
      mean, std = self._stats()
      z = z * std + mean
    dp = sharding.data_parallel_size(self.mesh)
    return _run_batched(self._fn("decode"), self._state, z, self.mesh,
                        _batch_size(len(z), dp, batch_size))

  def reconstruct(self, images, *, batch_size: int | None = None) -> np.ndarray:
    """uint8 (N, S, S, 3): decode(encode(images)) in one pass."""
    return self._images_call("reconstruct", images, batch_size)

  def features(self, images, *, batch_size: int | None = None) -> np.ndarray:
    """float32 (N, h, w, D): the encoder's semantic features (RAE recipe: the last block's
    patch tokens, normalised without affine), what the semantic VAE compresses."""
    return self._images_call("features", images, batch_size)

  def _stats(self) -> tuple[np.ndarray, np.ndarray]:
    if not self.latent_stats:
      raise ValueError(f"the run (step {self.step}) saved no latent statistics "
                       "(config.latent_stats_batches=0); use normalize=False")
    return (np.asarray(self.latent_stats["mean"], np.float32),
            np.asarray(self.latent_stats["std"], np.float32))


# --- the generator ---------------------------------------------------------------------------

class Generator(_Run):
  """A trained text-to-image run (or an edit run, sampled without a source image).

  Example:
    >>> from psvae_jax import api
    >>> gen = api.Generator.load("/tmp/psvae/pipeline/t2i")
    >>> images = gen.generate(["a red circle", "two blue squares"], seed=0, num_images=2)
    >>> images.shape                          # prompt-major: both of prompt 0, then prompt 1
    (4, 64, 64, 3)
  """

  TASKS = GENERATOR_TASKS

  def generate(self, prompts: str | Sequence[str], *, seed: int = 0, steps: int | None = None,
               cfg_scale: float | None = None, num_images: int = 1,
               batch_size: int | None = None) -> np.ndarray:
    """uint8 (len(prompts) * num_images, S, S, 3), each prompt's images next to each other.

    steps / cfg_scale default to the run's config.flow (sample_steps, cfg_scale; 1 = no
    guidance). Batch b draws its noise from fold_in(key(seed), b): the same arguments give the
    same images."""
    from psvae_jax.tools.eval_t2i import generate_images

    prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    if not prompts:
      raise ValueError("no prompts given")
    if num_images < 1:
      raise ValueError(f"num_images={num_images} must be >= 1")
    rows = [p for p in prompts for _ in range(num_images)]
    dp = sharding.data_parallel_size(self.mesh)
    flow = self.task.config.flow
    saved = (flow.sample_steps, flow.cfg_scale)
    try:
      if steps is not None:
        flow.sample_steps = int(steps)
      if cfg_scale is not None:
        flow.cfg_scale = float(cfg_scale)
      return generate_images(self.task, self.model, rows,
                             batch_size=_batch_size(len(rows), dp, batch_size), seed=seed,
                             mesh=self.mesh)
    finally:
      flow.sample_steps, flow.cfg_scale = saved

  def sampling_settings(self) -> dict:
    """The run's sampler settings: Euler steps, inference shift and CFG scale."""
    f = self.task.config.flow
    return {"sample_steps": int(f.sample_steps), "sample_shift": float(f.sample_shift),
            "cfg_scale": float(f.cfg_scale)}


# --- the editor ------------------------------------------------------------------------------

class Editor(_Run):
  """A trained instruction-editing run (configs/edit.py).

  Example:
    >>> from PIL import Image
    >>> from psvae_jax import api
    >>> editor = api.Editor.load("/tmp/psvae/pipeline/edit")
    >>> (out,) = editor.edit([Image.open("in.png")], ["make the circle blue"], seed=0)
    >>> out.save("out.png")                   # PIL in, PIL out, at the input's size
  """

  TASKS = ("edit",)

  def edit(self, images, instructions: str | Sequence[str], *, seed: int = 0,
           steps: int | None = None, cfg_scale: float | None = None,
           image_cfg_scale: float | None = None, batch_size: int = 8):
    """Edits each image with its instruction (one instruction for all when a string is given).

    The images are resized to the run's square size for editing and the edits back to each
    input's size; PIL images in give a list of PIL images out, arrays give a uint8 array (a
    list of arrays when the inputs' sizes differ). steps, cfg_scale (text) and
    image_cfg_scale default to the run's config.flow. Batch b draws its noise from
    fold_in(key(seed), b)."""
    from PIL import Image

    squares, sizes, pil = as_uint8_images(images, int(self.config.data.image_size))
    if isinstance(instructions, str):
      instructions = [instructions] * len(squares)
    edited = self.task.edit(self.model, squares, list(instructions), seed=seed,
                            batch_size=batch_size, text_scale=cfg_scale,
                            image_scale=image_cfg_scale, num_steps=steps)
    back = [Image.fromarray(e) if tuple(size) == e.shape[1::-1]
            else Image.fromarray(e).resize(tuple(size), Image.BICUBIC)
            for e, size in zip(edited, sizes)]
    if pil:
      return back
    arrays = [np.asarray(b) for b in back]
    return np.stack(arrays) if len(set(sizes)) == 1 else arrays
