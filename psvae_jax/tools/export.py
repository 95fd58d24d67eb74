"""Exports a finished run's networks to the layouts PyTorch users load.

  python -m psvae_jax.tools.export --workdir=DIR --to=transformers|diffusers|safetensors \
      --out=OUT [--step=N] [--noema]

  transformers  the (fine-tuned) representation encoder of an S-VAE / PS-VAE / T2I / edit run
                as a Dinov2Model, Dinov2WithRegistersModel or SiglipVisionModel directory
                (config.json + model.safetensors): `AutoModel.from_pretrained(OUT)`.
  diffusers     OUT/pixel_decoder: the pixel decoder as diffusers' VAE `Decoder` (its arguments
                in decoder_config.json, its state dict in decoder.safetensors, the latent
                statistics in latent_stats.json); for a T2I run also OUT/transformer: the
                generator as an SD3Transformer2DModel directory, or a one-line refusal naming
                what SD3 cannot express (a DDT head, learned positions, ...). SD3 attends to
                every text token, the generator hides padded ones: give it unpadded states.
  safetensors   OUT/autoencoder.safetensors + OUT/autoencoder_config.json: encoder, semantic
                VAE (E_s, D_s), pixel decoder and latent statistics of an S-VAE / PS-VAE run,
                each part in the layout of the PyTorch module that rebuilds it (see the JSON).
Weights are the run's EMA weights unless --noema. Needs torch, and transformers / diffusers for
their formats. Prints one JSON summary (files written).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app, flags

TARGETS = ("transformers", "diffusers", "safetensors")


class ExportError(ValueError):
  """The run cannot be exported as asked; the message says why."""


def _open(workdir: str, step: int | None, ema: bool):
  from psvae_jax import api
  task, model, config, extras, _ = api._open_run(workdir, step, ema, None)
  _refuse_scanned(config)
  return task, model, config, extras


def _refuse_scanned(config) -> None:
  m = config.model
  scanned = m.get("scan_layers") or m.get("autoencoder", {}).get("scan_layers")
  if scanned:
    raise ExportError("the run keeps its layers scanned (model.scan_layers=True); export "
                      "reads unscanned layers only")


def _metadata(workdir: str, config, extras) -> dict:
  return {"run": os.path.abspath(workdir), "task": config.task, "step": int(extras["step"]),
          "weights": extras["weights"]}


def export_transformers(workdir: str, out: str, *, step=None, ema=True) -> dict[str, Any]:
  """The run's encoder as a transformers directory."""
  from psvae_jax.ports import hf_export

  _, model, config, extras = _open(workdir, step, ema)
  encoder = getattr(model, "encoder", None)
  if encoder is None:
    raise ExportError(f"{workdir}: a {config.task!r} run has no representation encoder")
  hf_config = hf_export.encoder_hf_config(encoder.config)
  meta = _metadata(workdir, config, extras)
  meta["semantic_features"] = (
      "RAE recipe: last_hidden_state before the final LayerNorm (output_hidden_states[-1]), "
      "prefix tokens dropped, normalised per token without affine")
  files = hf_export.save_transformers_dir(out, hf_config, hf_export.encoder_tensors(
      encoder, hf_config), metadata=meta)
  return {**meta, "to": "transformers", "model_type": hf_config["model_type"], "files": files}


def export_diffusers(workdir: str, out: str, *, step=None, ema=True) -> dict[str, Any]:
  """The pixel decoder as a diffusers Decoder and, for a T2I run, the SD3 transformer."""
  from psvae_jax.ports import diffusers_export as de

  task, model, config, extras = _open(workdir, step, ema)
  meta = _metadata(workdir, config, extras)
  args = None
  if config.task in ("t2i", "edit"):
    args = de.sd3_config(model.generator.config)  # refuse before writing anything
  files = []
  if config.task in ("t2i", "edit"):
    files += de.save_sd3_dir(os.path.join(out, "transformer"), args,
                             de.sd3_tensors(model.generator, args))
  arguments = de.decoder_arguments(model.pixel_decoder)
  files += de.save_decoder_dir(os.path.join(out, "pixel_decoder"), arguments,
                               de.decoder_tensors(model.pixel_decoder, arguments),
                               extras.get("latent_stats"))
  return {**meta, "to": "diffusers", "files": files}


def export_safetensors(workdir: str, out: str, *, step=None, ema=True) -> dict[str, Any]:
  """The whole autoencoder (see psvae_jax.ports.autoencoder_export)."""
  from psvae_jax.ports import autoencoder_export

  _, model, config, extras = _open(workdir, step, ema)
  if config.task not in ("svae", "psvae"):
    raise ExportError(f"{workdir}: --to=safetensors exports S-VAE / PS-VAE runs; this is a "
                      f"{config.task!r} run")
  meta = _metadata(workdir, config, extras)
  files = autoencoder_export.save_autoencoder(out, model, config.model,
                                              image_size=int(config.data.image_size),
                                              latent_stats=extras.get("latent_stats"),
                                              metadata=meta)
  return {**meta, "to": "safetensors", "files": files}


EXPORTERS = {"transformers": export_transformers, "diffusers": export_diffusers,
             "safetensors": export_safetensors}


def export(workdir: str, to: str, out: str, *, step: int | None = None,
           ema: bool = True) -> dict[str, Any]:
  """Runs one export (see the module docstring); returns its summary."""
  if to not in EXPORTERS:
    raise ExportError(f"--to={to!r}: expected one of {TARGETS}")
  if not out:
    raise ExportError("--out is required (the directory to write)")
  return EXPORTERS[to](workdir, out, step=step, ema=ema)


def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The run's directory (with checkpoints/).", **f)
  flags.DEFINE_enum("to", None, list(TARGETS), "The format to write.", **f)
  flags.DEFINE_string("out", None, "Output directory.", **f)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", **f)
  flags.DEFINE_bool("ema", True, "Export the EMA weights when the run kept them.", **f)


def main(argv):
  from psvae_jax.checkpoint import CheckpointError
  from psvae_jax.ports.common import WeightLoadError

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  v = flags.FLAGS
  for name in ("workdir", "to", "out"):
    if v[name].value is None:
      raise app.UsageError(f"--{name} is required")
  try:
    summary = export(v.workdir, v.to, v.out, step=v.step, ema=v.ema)
  except (ExportError, WeightLoadError, CheckpointError, FileNotFoundError) as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
