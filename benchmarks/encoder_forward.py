"""Representation-encoder forward throughput: this project (JAX) vs transformers (PyTorch).

  python -m benchmarks.encoder_forward [--batch=8] [--image_size=224] [--repeats=10]
                                       [--out=benchmarks/out/encoder_forward.json]

DINOv2-B/14 with 4 registers (real shape: width 768, 12 layers, 12 heads, position grid for
518 px) with random weights, float32, 224 px input (16x16 patches + 5 prefix tokens). The
PyTorch model is built by transformers, saved as safetensors and ported with `ports.hf.load`, so
both sides run identical weights; the outputs are compared too. JAX: one jitted forward,
warm-up calls, then `repeats` timed calls with block_until_ready. PyTorch: transformers' default
attention (sdpa), torch.inference_mode, torch threads = CPU cores. Reported: median images/s
(wall clock) and the median process CPU seconds per batch (all threads), which is steadier when
other jobs share the CPU.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from benchmarks.timing import add_timing_args, format_rows, median_seconds, write_json

DEFAULT_OUT = os.path.join("benchmarks", "out", "encoder_forward.json")


def _reference_model():
  import torch
  from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
  torch.manual_seed(0)
  config = Dinov2WithRegistersConfig(hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, patch_size=14, image_size=518,
                                     num_register_tokens=4)
  return Dinov2WithRegistersModel(config).eval()


def _flops_per_image(tokens: int, image_size: int) -> float:
  from psvae_jax.models.flops import vit_forward_flops
  patches = (image_size // 14) ** 2
  return vit_forward_flops(768, 12, 3072, tokens) + 2 * patches * 14 * 14 * 3 * 768


def run(batch: int = 8, image_size: int = 224, warmup: int = 2, repeats: int = 10,
        out: str | None = DEFAULT_OUT) -> dict:
  """Measures both forwards; returns (and writes to `out` as JSON, unless None) the results."""
  import jax
  import torch
  from flax import nnx

  from psvae_jax.ports import hf

  cores = os.cpu_count() or 1
  torch.set_num_threads(cores)
  model = _reference_model()
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp, safe_serialization=True)
    module = hf.load(tmp)

  x = np.random.default_rng(0).standard_normal((batch, image_size, image_size, 3)).astype(
      np.float32)
  x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  graphdef, state = nnx.split(module)
  forward = jax.jit(lambda state, pixels: nnx.merge(graphdef, state)(pixels))
  x_jax = jax.device_put(x)

  start = time.perf_counter()
  ours = forward(state, x_jax).block_until_ready()
  compile_s = time.perf_counter() - start
  jax_s, jax_cpu = median_seconds(lambda: forward(state, x_jax).block_until_ready(), warmup,
                                   repeats)

  with torch.inference_mode():
    reference = model(pixel_values=x_torch).last_hidden_state.numpy()
    torch_s, torch_cpu = median_seconds(lambda: model(pixel_values=x_torch), warmup, repeats)

  result = {
      "what": "DINOv2-B/14+registers forward, float32",
      "batch": batch, "image_size": image_size, "tokens": int(ours.shape[1]),
      "repeats": repeats, "cpu_cores": cores, "backend": jax.default_backend(),
      "jax_version": jax.__version__, "torch_version": torch.__version__,
      "jax_images_per_s": batch / jax_s, "torch_images_per_s": batch / torch_s,
      "ratio": torch_s / jax_s, "jax_compile_s": compile_s,
      # CPU seconds (all threads) per batch: the work done, less sensitive to a shared CPU.
      "jax_cpu_s_per_batch": jax_cpu, "torch_cpu_s_per_batch": torch_cpu,
      "load_average_1min": os.getloadavg()[0],
      # Analytic matmul FLOPs per image (12 blocks on 261 tokens + patch embedding).
      "flops_per_image": _flops_per_image(int(ours.shape[1]), image_size),
      "max_abs_err_vs_transformers": float(np.abs(np.asarray(ours) - reference).max()),
  }
  write_json(result, out)
  return result


def format_table(result: dict) -> str:
  rows = [("what", "this project", "reference", "ratio"),
          (f"{result['what']}, batch {result['batch']}, {result['image_size']} px: images/s",
           f"{result['jax_images_per_s']:.2f}", f"{result['torch_images_per_s']:.2f}",
           f"{result['ratio']:.2f}x")]
  return format_rows(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--image_size", type=int, default=224)
  add_timing_args(parser, warmup=2, repeats=10, out=DEFAULT_OUT)
  args = parser.parse_args(argv)
  result = run(args.batch, args.image_size, args.warmup, args.repeats, args.out)
  print(format_table(result))
  print(f"max abs err vs transformers: {result['max_abs_err_vs_transformers']:.2e}; "
        f"jax compile {result['jax_compile_s']:.1f}s; CPU s/batch jax "
        f"{result['jax_cpu_s_per_batch']:.2f} torch {result['torch_cpu_s_per_batch']:.2f}; "
        f"{result['cpu_cores']} cores, load average {result['load_average_1min']:.1f}"
        + (f"; written to {args.out}" if args.out else ""))


if __name__ == "__main__":
  main()
