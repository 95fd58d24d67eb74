"""Linear probe on a finished S-VAE / PS-VAE run's latents (how much semantics z keeps).

  python -m psvae_jax.tools.linear_probe --workdir=DIR --train_data=SOURCE --eval_data=SOURCE \
      [--num_train=N] [--num_eval=M] [--out=DIR/linear_probe.json]

Encodes labelled images (sources with a `label`: synthetic:shapes with its 18 colour x shape
classes, tfds:imagenet2012, ...) to the posterior mean z (h x w x C, e.g. 16x16x96; EMA weights
when the run kept them), then trains `psvae_jax.metrics.linear_probe` (standardised features,
AdamW on the cross-entropy) on the training images and reports top-1 / top-5 on the eval
images. Training images come from the training part of --train_data (shuffled by --seed), eval
images from the held-out part of --eval_data (a disjoint index range for synthetic sources, the
validation split for tfds, the held-out subset for folders / shards), so the same source may be
given for both. All latents are held in host memory (N x h x w x C float32).
"""
from __future__ import annotations

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
from psvae_jax.runs import default_mesh, load_run_model
from psvae_jax.tools import cli, files
from psvae_jax.tools.eval_recon import eval_data_config


def training_images(data_config, num_images: int, batch_size: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of the first `num_images` of the shuffled training part of a source."""
  from psvae_jax import data as data_lib

  cfg = dict(data_config, eval_source="", shuffle=True, random_flip=False)
  iterator = data_lib.make_train_iterator(cfg, global_batch_size=batch_size, seed=seed,
                                          process_index=0, process_count=1)
  images, labels = [], []
  try:
    for _ in range(-(-num_images // batch_size)):
      batch = next(iterator)
      _require_labels(batch, cfg["source"])
      images.append(np.asarray(batch["image"]))
      labels.append(np.asarray(batch["label"]))
  finally:
    iterator.close()
  return np.concatenate(images)[:num_images], np.concatenate(labels)[:num_images]


def eval_images(data_config, num_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of `num_images` held-out examples of a source."""
  from psvae_jax import data as data_lib

  batch = data_lib.make_eval_batches(data_config, batch_size=num_images, num_batches=1,
                                     seed=seed)[0]
  _require_labels(batch, data_config["eval_source"] or data_config["source"])
  return np.asarray(batch["image"]), np.asarray(batch["label"])


def _require_labels(batch, source: str) -> None:
  if "label" not in batch:
    raise ValueError(f"data source {source!r} has no 'label' field; the linear probe needs "
                     "labelled images (e.g. synthetic:shapes, tfds:imagenet2012)")


def make_latent_fn(model, config):
  """Jitted (model_state, uint8 images) -> posterior mean z (B, h, w, C) float32."""
  from psvae_jax.tasks import autoencoder_parts

  graphdef, _ = nnx.split(model)

  def run(state, images):
    m = nnx.merge(graphdef, state)
    features = autoencoder_parts.encoder_features(m.encoder, images, config.model)
    return m.svae.encode(features).mean.astype(jnp.float32)

  return jax.jit(full_precision(run))


def latents(latent_fn, state, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """Posterior means of `images`, `batch_size` at a time (the last batch padded, then cut)."""
  batch_sh = sharding.batch_sharding(mesh, 4)
  out = []
  with jax.set_mesh(mesh):
    for start in range(0, images.shape[0], batch_size):
      chunk = images[start:start + batch_size]
      valid = chunk.shape[0]
      if valid < batch_size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
      z = latent_fn(state, jax.device_put(chunk, batch_sh))
      out.append(np.asarray(jax.device_get(z))[:valid])
  return np.concatenate(out)


def infer_num_classes(source: str, data_config, *label_sets: np.ndarray) -> tuple[int, str]:
  """(class count, where it comes from): synthetic:shapes' NUM_CLASSES, a tfds dataset's
  `label` feature, else the largest label seen + 1."""
  from psvae_jax.data import parse_source
  from psvae_jax.data.synthetic import NUM_CLASSES

  spec = parse_source(source)
  if spec.scheme == "synthetic":
    return NUM_CLASSES, "synthetic world (colour x shape)"
  if spec.scheme == "tfds":
    import tensorflow_datasets as tfds
    builder = tfds.builder(spec.arg, data_dir=data_config.get("tfds_data_dir") or None)
    label = builder.info.features["label"]
    if getattr(label, "num_classes", None):
      return int(label.num_classes), f"tfds:{spec.arg} label feature"
  seen = int(max(int(np.max(labels)) for labels in label_sets)) + 1
  return seen, "largest label seen + 1 (pass --num_classes to set it)"


def probe_latents(workdir: str, train_data: str, eval_data: str, *, num_train: int = 10_000,
                  num_eval: int = 2_000, batch_size: int = 32, num_classes: int = 0,
                  pool: str = "flatten", epochs: int = 100, probe_batch_size: int = 0,
                  learning_rate: float = 1e-3, weight_decay: float = 1e-4, out: str = "",
                  use_ema: bool = True, seed: int = 0, mesh=None) -> dict[str, Any]:
  """Runs the latent linear probe; writes the JSON (default WORKDIR/linear_probe.json) and
  returns it. `probe_batch_size` 0 = full-batch probe training; `num_classes` 0 = inferred."""
  from psvae_jax.metrics.linear_probe import linear_probe
  from psvae_jax.tasks.autoencoder import AutoencoderTask

  started = time.perf_counter()
  if jax.process_count() > 1:
    raise NotImplementedError("linear_probe runs in one process (any number of local devices)")
  if num_train < 1 or num_eval < 1:
    raise ValueError(f"--num_train={num_train} and --num_eval={num_eval} must be >= 1")
  mesh = default_mesh() if mesh is None else mesh
  dp = sharding.data_parallel_size(mesh)
  if batch_size < 1 or batch_size % dp:
    raise ValueError(f"--batch_size={batch_size} must be a positive multiple of the "
                     f"{dp} devices the batch is split over")
  task, model, config, extras = load_run_model(workdir, use_ema=use_ema, mesh=mesh)
  if not isinstance(task, AutoencoderTask):
    raise ValueError(f"{workdir}: linear_probe reads autoencoder latents (svae, psvae); this "
                     f"run is config.task={config.task!r}")
  train_cfg = eval_data_config(config.data, train_data, 0)
  eval_cfg = eval_data_config(config.data, eval_data, num_eval)
  x_train, y_train = training_images(train_cfg, num_train, batch_size, seed)
  x_eval, y_eval = eval_images(eval_cfg, num_eval, seed)

  latent_fn = make_latent_fn(model, config)
  state = nnx.state(model)
  z_train = latents(latent_fn, state, x_train, batch_size, mesh)
  z_eval = latents(latent_fn, state, x_eval, batch_size, mesh)
  if num_classes:
    classes, classes_from = num_classes, "--num_classes"
  else:
    classes, classes_from = infer_num_classes(train_data, train_cfg, y_train, y_eval)
  scores = linear_probe(z_train, y_train, z_eval, y_eval, num_classes=classes, pool=pool,
                        epochs=epochs, batch_size=probe_batch_size or None,
                        learning_rate=learning_rate, weight_decay=weight_decay, seed=seed)
  result: dict[str, Any] = {
      "workdir": workdir, "task": config.task, "step": int(extras["step"]),
      "weights": extras["weights"], "train_data": train_data, "eval_data": eval_data,
      "n_train": int(z_train.shape[0]), "n_eval": int(z_eval.shape[0]),
      "latent_shape": list(z_train.shape[1:]), "pool": pool, "num_classes": int(classes),
      "num_classes_from": classes_from,
      "chance_top1": 1.0 / classes,
      "top1": scores["top1"], "top5": scores["top5"], "train_top1": scores["train_top1"],
      "final_loss": scores["final_loss"],
      "probe": {"epochs": epochs, "batch_size": probe_batch_size or "full",
                "learning_rate": learning_rate, "weight_decay": weight_decay,
                "features": "posterior mean z, standardised with the training set's "
                            "per-dimension mean/std"},
      "elapsed_s": round(time.perf_counter() - started, 2),
  }
  out = out or os.path.join(workdir, "linear_probe.json")
  return files.write_result(out, result)


# --- command line --------------------------------------------------------------------------

def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The run's directory (with checkpoints/).", **f)
  flags.DEFINE_string("train_data", None, "Labelled source whose training part trains the "
                      "probe.", **f)
  flags.DEFINE_string("eval_data", None, "Labelled source whose held-out part scores it.", **f)
  flags.DEFINE_integer("num_train", 10_000, "Training images.", **f)
  flags.DEFINE_integer("num_eval", 2_000, "Eval images.", **f)
  flags.DEFINE_integer("batch_size", 32, "Encoding batch (a multiple of the device count).",
                       **f)
  flags.DEFINE_integer("num_classes", 0, "Classes (0 = inferred: synthetic:shapes' 18, a tfds "
                       "dataset's label feature, else the largest label seen + 1).", **f)
  flags.DEFINE_enum("pool", "flatten", ["flatten", "mean"], "Latent pooling before the "
                    "linear layer.", **f)
  flags.DEFINE_integer("epochs", 100, "Probe training epochs.", **f)
  flags.DEFINE_integer("probe_batch_size", 0, "Probe minibatch (0 = full batch).", **f)
  flags.DEFINE_float("learning_rate", 1e-3, "Probe AdamW learning rate.", **f)
  flags.DEFINE_float("weight_decay", 1e-4, "Probe AdamW weight decay.", **f)
  flags.DEFINE_string("out", "", "Output JSON (default WORKDIR/linear_probe.json).", **f)
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.", **f)
  flags.DEFINE_integer("seed", 0, "Data order and probe initialisation.", **f)


def run_from_flags(flag_values=flags.FLAGS) -> dict[str, Any]:
  """Runs the probe with parsed flags; returns the JSON written."""
  v = flag_values
  cli.require_flags(v, "workdir", "train_data", "eval_data")
  return probe_latents(
      v.workdir, v.train_data, v.eval_data, num_train=v.num_train, num_eval=v.num_eval,
      batch_size=v.batch_size, num_classes=v.num_classes, pool=v.pool, epochs=v.epochs,
      probe_batch_size=v.probe_batch_size, learning_rate=v.learning_rate,
      weight_decay=v.weight_decay, out=v.out, use_ema=v.use_ema, seed=v.seed)


main = cli.json_main(run_from_flags)


if __name__ == "__main__":
  define_flags()
  app.run(main)
