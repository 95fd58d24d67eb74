"""Converts a transformers checkpoint once into the project's Orbax format.

  python -m psvae_jax.tools.convert --src=PATH --out=DIR

PATH is a local transformers checkpoint directory (config.json + safetensors; model types
dinov2, dinov2_with_registers, siglip, siglip_vision_model, qwen2). DIR receives
port_config.json and params/ (see psvae_jax.ports.converted); stage configs name DIR as their
encoder or text-encoder init and restore it with `ports.converted.load_converted(DIR)`.
"""
from __future__ import annotations

import os

from absl import app, flags

from psvae_jax.tools import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  flags.DEFINE_string("src", None, "transformers checkpoint directory")
  flags.DEFINE_string("out", None, "output directory for port_config.json and params/")


def convert(src: str, out: str) -> dict:
  """Ports `src` with ports.hf.load and writes it to `out`; returns the port config written."""
  from psvae_jax.ports import converted, hf
  module = hf.load(src)
  model_type = hf.read_config(src)["model_type"]
  converted.save_converted(module, out, model_type=model_type, source=os.path.abspath(src))
  return converted.port_config_dict(module, model_type=model_type, source=os.path.abspath(src))


def main(argv):
  cli.no_arguments(argv)
  written = convert(FLAGS.src, FLAGS.out)
  print(f"wrote {written['model_type']} ({written['kind']}) to {os.path.abspath(FLAGS.out)}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["src", "out"])
  app.run(main)
