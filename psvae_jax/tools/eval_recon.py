"""Reconstruction quality of a finished S-VAE / PS-VAE run on held-out images.

  python -m psvae_jax.tools.eval_recon --workdir=DIR --data=SOURCE [--num_images=N] \
      [--batch_size=B] [--inception_weights=pt_inception.safetensors] [--out=DIR/eval_recon.json]

Reconstructs N held-out images of SOURCE (the part of it kept out of training, see
`psvae_jax.data.make_eval_batches`; `--noheld_out` uses all of SOURCE, e.g. a folder of
validation images) at the run's image size with the posterior mean z (EMA weights when the run
kept them), and writes a JSON with:
  psnr, ssim   per image on uint8-quantised images (data_range 255; SSIM with skimage's
               Gaussian-window settings), averaged over images, as reconstruction tables report;
  lpips        LPIPS-VGG16 of the original vs the quantised reconstruction, when LPIPS weights
               are at hand (the run's own when it trained with pretrained ones, or
               --lpips_weights=DIR); otherwise omitted with `lpips_note`;
  rfid         Frechet distance of Inception pool3 features (pytorch-fid's network, weights from
               --inception_weights) between originals and reconstructions, streamed batch by
               batch; null with `rfid_note` without weights. --allow_random_inception computes
               it on random weights for smoke tests only, labelled as such in the JSON;
  semantic_cosine  per-token cosine of D_s(z) to the semantic target (the encoder's features;
               the frozen teacher's in PS-VAE), averaged over tokens and images;
plus n_images, data, step, and a PNG grid of (original, reconstruction) pairs next to the JSON.
The batch size must be a multiple of the device count (the batch is split over devices).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from psvae_jax import sharding
from psvae_jax.metrics.precision import full_precision
from psvae_jax.runs import default_mesh
from psvae_jax.tools import cli, files
from psvae_jax.tree_paths import path_keys

RANDOM_INCEPTION_LABEL = ("RANDOM Inception weights (--allow_random_inception): a smoke-test "
                          "number, NOT an rFID comparable to any published value")


# --- inputs --------------------------------------------------------------------------------

def eval_data_config(run_data_config, source: str, num_images: int, *, held_out: bool = True):
  """The run's data config pointed at `source`: its held-out part (as in training, so a run's
  own source gives exactly the images it never trained on), or all of it (`held_out=False`)."""
  from psvae_jax.data import parse_source

  cfg = run_data_config.to_dict() if hasattr(run_data_config, "to_dict") else dict(
      run_data_config)
  cfg["source"] = source
  cfg["eval_source"] = "" if held_out else source
  # Synthetic held-out images live in their own index range [synthetic_size, +eval_size), so
  # widening it never overlaps training; other sources keep the run's held-out subset.
  if parse_source(source).scheme == "synthetic":
    cfg["eval_size"] = max(int(cfg.get("eval_size", 0)), num_images)
  return cfg


def held_out_images(data_config, num_images: int, seed: int) -> np.ndarray:
  """(num_images, S, S, 3) uint8 held-out images (all in host memory)."""
  from psvae_jax import data as data_lib
  batch = data_lib.make_eval_batches(data_config, batch_size=num_images, num_batches=1,
                                     seed=seed)[0]
  return np.asarray(batch["image"])


def random_fid_inception(seed: int = 0) -> nnx.Module:
  """FIDInceptionV3 with random He-normal conv kernels and identity BatchNorm statistics.

  Filled from NumPy on the abstract model: building the 24M-parameter network through its own
  initialisers costs tens of seconds of compilation on a CPU. For smoke tests only.
  """
  from psvae_jax.models.inception import FIDInceptionV3

  abstract = nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  fill = {"scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0}

  def leaf(path, x):
    name = path_keys(path)[-1]
    if name == "kernel":
      fan_in = int(np.prod(x.shape[:-1]))
      return jnp.asarray(rng.normal(0.0, math.sqrt(2.0 / fan_in), x.shape).astype(np.float32))
    if name in fill:
      return jnp.full(x.shape, fill[name], x.dtype)
    raise ValueError(f"random_fid_inception: unexpected parameter {path}")

  values = jax.tree_util.tree_map_with_path(leaf, state.to_pure_dict())
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def fid_inception(weights: str, *, allow_random: bool) -> tuple[nnx.Module | None, str]:
  """(pytorch-fid Inception or None, what the rFID number is computed with)."""
  if weights:
    from psvae_jax.ports.torch_hub import inception_from_state_dict
    return inception_from_state_dict(weights), os.path.abspath(weights)
  if allow_random:
    return random_fid_inception(), RANDOM_INCEPTION_LABEL
  return None, ("no --inception_weights given: rFID needs pytorch-fid's pretrained Inception "
                "(pt_inception-2015-12-05 as safetensors); random weights would make it "
                "meaningless")


def lpips_module(model, config, lpips_weights: str) -> tuple[nnx.Module | None, str]:
  """(LPIPS network or None, where its weights come from / why it is omitted)."""
  if lpips_weights:
    from psvae_jax.ports.torch_hub import lpips_from_state_dicts
    module = lpips_from_state_dicts(os.path.join(lpips_weights, "vgg16.safetensors"),
                                    os.path.join(lpips_weights, "lpips_vgg.safetensors"))
    return module, os.path.abspath(lpips_weights)
  if model.lpips is None:
    return None, ("the run has no LPIPS network (config.loss.perceptual_weight=0); pass "
                  "--lpips_weights=DIR (vgg16.safetensors + lpips_vgg.safetensors) to add it")
  if not config.model.lpips_weights:
    return None, ("the run's LPIPS network has random weights (config.model.lpips_weights was "
                  "''); pass --lpips_weights=DIR for a meaningful LPIPS")
  return model.lpips, f"the run's own ({config.model.lpips_weights})"


# --- the jitted batch computations ---------------------------------------------------------

def make_recon_fn(model, config, lpips):
  """Jitted (model_state, lpips_state, uint8 images) -> per-image metrics and uint8 recons."""
  from psvae_jax.metrics.psnr import psnr
  from psvae_jax.metrics.ssim import ssim
  from psvae_jax.tasks import autoencoder_parts
  from psvae_jax.tasks.autoencoder import images_to_unit_range, reconstruct, unit_range_to_uint8

  graphdef, _ = nnx.split(model)
  lpips_graphdef = nnx.split(lpips)[0] if lpips is not None else None
  use_teacher = config.task == "psvae"

  def run(state, lpips_state, images):
    m = nnx.merge(graphdef, state)
    recon, features, _, x_rec = reconstruct(m, images, config.model)
    target = (autoencoder_parts.encoder_features(m.teacher, images, config.model) if use_teacher
              else features)
    recon, target = recon.astype(jnp.float32), target.astype(jnp.float32)
    cos = jnp.sum(recon * target, -1) / (
        jnp.linalg.norm(recon, axis=-1) * jnp.linalg.norm(target, axis=-1) + 1e-8)
    rec_u8 = unit_range_to_uint8(x_rec.astype(jnp.float32))
    a, b = images.astype(jnp.float32), rec_u8.astype(jnp.float32)
    out = {"psnr": psnr(a, b, data_range=255.0), "ssim": ssim(a, b, data_range=255.0),
           "semantic_cosine": jnp.mean(cos.reshape(cos.shape[0], -1), axis=1)}
    if lpips_graphdef is not None:
      out["lpips"] = nnx.merge(lpips_graphdef, lpips_state)(
          images_to_unit_range(images), images_to_unit_range(rec_u8))
    return out, rec_u8

  return jax.jit(full_precision(run))


def make_feature_fn(inception):
  """Jitted (inception_state, uint8 images) -> (B, 2048) pool3 features."""
  if not getattr(inception, "normalize_input", False):
    raise ValueError("the FID Inception must take [0, 1] inputs (normalize_input=True)")
  graphdef, _ = nnx.split(inception)
  return jax.jit(full_precision(lambda state, images: nnx.merge(graphdef, state)(
      images.astype(jnp.float32) / 255.0)))


# --- outputs -------------------------------------------------------------------------------

def pair_grid(originals: np.ndarray, reconstructions: np.ndarray,
              pairs_per_row: int = 4) -> np.ndarray:
  """(original, reconstruction) side by side, `pairs_per_row` pairs per row, 2 px gutters."""
  from psvae_jax.metrics_log import image_grid
  pairs = np.stack([originals, reconstructions], axis=1).reshape(
      (-1,) + originals.shape[1:])
  return image_grid(pairs, columns=2 * min(pairs_per_row, originals.shape[0]))


def _finite_or_none(value: float) -> float | None:
  return float(value) if math.isfinite(value) else None


# --- the tool ------------------------------------------------------------------------------

def evaluate_reconstruction(workdir: str, data: str, *, num_images: int = 1000,
                            batch_size: int = 32, inception_weights: str = "",
                            allow_random_inception: bool = False, lpips_weights: str = "",
                            out: str = "", grid_images: int = 16, held_out: bool = True,
                            use_ema: bool = True, seed: int = 0, mesh=None) -> dict[str, Any]:
  """Evaluates a run's reconstructions; writes the JSON (and the grid PNG) and returns it.

  See the module docstring for the metrics. `out` defaults to WORKDIR/eval_recon.json; the
  grid goes to the same directory as `<out stem>_grid.png`.
  """
  from psvae_jax import data as data_lib
  from psvae_jax.tasks.autoencoder import AutoencoderTask

  started = time.perf_counter()
  if jax.process_count() > 1:
    raise NotImplementedError("eval_recon runs in one process (any number of local devices)")
  if num_images < 2:
    raise ValueError(f"--num_images={num_images}: at least 2 images are needed")
  mesh = default_mesh() if mesh is None else mesh
  dp = sharding.data_parallel_size(mesh)
  if batch_size < 1 or batch_size % dp:
    raise ValueError(f"--batch_size={batch_size} must be a positive multiple of the "
                     f"{dp} devices the batch is split over")
  from psvae_jax import api
  task, model, config, extras, _ = api._open_run(workdir, None, use_ema, mesh)
  if not isinstance(task, AutoencoderTask):
    raise ValueError(f"{workdir}: eval_recon evaluates autoencoder runs (svae, psvae); this run "
                     f"is config.task={config.task!r}")
  data_config = eval_data_config(config.data, data, num_images, held_out=held_out)
  data_lib.resolve_data_config(data_config)  # bad keys or values fail before any work
  inception, inception_label = fid_inception(inception_weights,
                                             allow_random=allow_random_inception)
  lpips, lpips_label = lpips_module(model, config, lpips_weights)
  images = held_out_images(data_config, num_images, seed)

  replicated = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh, 4)
  state = nnx.state(model)
  lpips_state = None
  if lpips is not None:
    lpips_state = nnx.state(lpips) if lpips is model.lpips else jax.device_put(
        nnx.state(lpips), replicated)
  recon_fn = make_recon_fn(model, config, lpips)
  if inception is not None:
    inception_state = jax.device_put(nnx.state(inception), replicated)
    feature_fn = make_feature_fn(inception)
    from psvae_jax.metrics.fid import FeatureStats, frechet_distance
    stats_real, stats_fake = FeatureStats(), FeatureStats()

  per_image: dict[str, list[np.ndarray]] = {}
  grid_recons: list[np.ndarray] = []
  n_grid = min(grid_images, num_images)
  with jax.set_mesh(mesh):
    for start in range(0, num_images, batch_size):
      chunk = images[start:start + batch_size]
      valid = chunk.shape[0]
      if valid < batch_size:  # one shape for every batch: pad with copies, drop after
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
      device_images = jax.device_put(chunk, batch_sh)
      metrics, rec_u8 = recon_fn(state, lpips_state, device_images)
      for k, v in jax.device_get(metrics).items():
        per_image.setdefault(k, []).append(np.asarray(v, np.float64)[:valid])
      if start < n_grid:
        grid_recons.append(np.asarray(jax.device_get(rec_u8))[:min(valid, n_grid - start)])
      if inception is not None:
        stats_real.update(np.asarray(jax.device_get(
            feature_fn(inception_state, device_images)))[:valid])
        stats_fake.update(np.asarray(jax.device_get(feature_fn(inception_state, rec_u8)))[:valid])

  values = {k: np.concatenate(v) for k, v in per_image.items()}
  psnr_mean = float(np.mean(values["psnr"]))
  result: dict[str, Any] = {
      "workdir": workdir, "task": config.task, "step": int(extras["step"]),
      "weights": extras["weights"], "data": data, "held_out": held_out,
      "image_size": int(config.data.image_size), "n_images": int(num_images),
      "batch_size": int(batch_size), "seed": int(seed),
      "psnr": _finite_or_none(psnr_mean),
      "ssim": float(np.mean(values["ssim"])),
      "semantic_cosine": float(np.mean(values["semantic_cosine"])),
      "semantic_target": "teacher" if config.task == "psvae" else "encoder",
  }
  if result["psnr"] is None:
    result["psnr_note"] = "some reconstructions are pixel-exact (infinite PSNR)"
  if lpips is not None:
    result["lpips"] = float(np.mean(values["lpips"]))
    result["lpips_weights"] = lpips_label
  else:
    result["lpips_note"] = f"LPIPS omitted: {lpips_label}"
  if inception is not None:
    result["rfid"] = max(frechet_distance(stats_real.mean, stats_real.covariance(),
                                          stats_fake.mean, stats_fake.covariance()), 0.0)
    result["rfid_inception"] = inception_label
    result["rfid_random_inception"] = inception_label == RANDOM_INCEPTION_LABEL
  else:
    result["rfid"] = None
    result["rfid_note"] = inception_label
  result["conventions"] = (
      "posterior-mean z; reconstructions clipped and quantised to uint8; PSNR/SSIM per image "
      "on uint8 values (data_range 255, SSIM Gaussian sigma 1.5), then averaged; LPIPS on "
      "[-1, 1] images; rFID on Inception pool3 of originals vs reconstructions")

  out = out or os.path.join(workdir, "eval_recon.json")
  grid_path = files.beside(out, "_grid.png")
  files.write_png(grid_path, pair_grid(images[:n_grid], np.concatenate(grid_recons)))
  result["grid"] = grid_path
  result["grid_layout"] = f"{n_grid} (original, reconstruction) pairs, 4 pairs per row"
  result["elapsed_s"] = round(time.perf_counter() - started, 2)
  return files.write_result(out, result)


# --- command line --------------------------------------------------------------------------

def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The run's directory (with checkpoints/).", **f)
  flags.DEFINE_string("data", None, "Data source (synthetic:shapes, folder:PATH, "
                      "arrayrecord:GLOB, tfds:NAME[:SPLIT]); its held-out part is used.", **f)
  flags.DEFINE_integer("num_images", 1000, "Held-out images to reconstruct.", **f)
  flags.DEFINE_integer("batch_size", 32, "Images per batch (a multiple of the device count).",
                       **f)
  flags.DEFINE_string("inception_weights", "", "pytorch-fid pt_inception-2015-12-05 weights as "
                      ".safetensors (needed for rFID).", **f)
  flags.DEFINE_bool("allow_random_inception", False, "Without --inception_weights, compute "
                    "rFID on RANDOM Inception weights (smoke tests only; labelled in the JSON).",
                    **f)
  flags.DEFINE_string("lpips_weights", "", "Directory with vgg16.safetensors and "
                      "lpips_vgg.safetensors (default: the run's own LPIPS, if pretrained).", **f)
  flags.DEFINE_string("out", "", "Output JSON (default WORKDIR/eval_recon.json); the grid PNG "
                      "is written next to it as <stem>_grid.png.", **f)
  flags.DEFINE_integer("grid_images", 16, "Images shown in the grid.", **f)
  flags.DEFINE_bool("held_out", True, "Use the held-out part of --data (as in training); "
                    "--noheld_out uses all of it.", **f)
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.", **f)
  flags.DEFINE_integer("seed", 0, "Order of the held-out images.", **f)


def run_from_flags(flag_values=flags.FLAGS) -> dict[str, Any]:
  """Runs the evaluation with parsed flags; returns the JSON written."""
  v = flag_values
  cli.require_flags(v, "workdir", "data")
  return evaluate_reconstruction(
      v.workdir, v.data, num_images=v.num_images, batch_size=v.batch_size,
      inception_weights=v.inception_weights, allow_random_inception=v.allow_random_inception,
      lpips_weights=v.lpips_weights, out=v.out, grid_images=v.grid_images,
      held_out=v.held_out, use_ema=v.use_ema, seed=v.seed)


main = cli.json_main(run_from_flags)

if __name__ == "__main__":
  define_flags()
  app.run(main)
