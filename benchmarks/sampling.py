"""Euler sampling throughput of the T2I generator with classifier-free guidance (images/s).

  python -m benchmarks.sampling [--config=configs/t2i.py:smoke] [--batch=8] [--steps=50] \
      [--cfg_scale=6.5] [--repeats=3] [--set=compute_dtype=bfloat16 ...] \
      [--out=benchmarks/out/sampling.json]

Random weights of the config's shapes (no checkpoint needed). One jitted call runs the whole
sampler: text encoding, `steps` Euler steps of the MMDiT on the doubled (unconditional +
conditional) batch, and the PS-VAE pixel decoder, as `T2ITask.generate` does during training.
Timed: warm-up, then `repeats` calls with block_until_ready, median. The captions come from
the config's data source (override it, e.g. --set=data.source=synthetic:shapes, where the
config's corpus is not at hand). The peak device memory is reported where the backend keeps
memory statistics (GPU, TPU).
"""
from __future__ import annotations

import argparse
import os
import time

from benchmarks.timing import (add_timing_args, format_bytes, format_rows, median_seconds,
                               peak_memory_bytes, write_json)
from benchmarks.train_step import apply_overrides


def sampling_config(config_spec: str, *, steps: int = 50, cfg_scale: float = 6.5,
                    overrides: tuple[str, ...] = ()):
  """The validated config sampling is timed with: random weights (no checkpoints required), one
  device, `steps` Euler steps at `cfg_scale`, then `overrides`."""
  from psvae_jax import config_base
  from psvae_jax.config_loader import load_config

  config = load_config(config_spec)
  with config.unlocked():
    config.init = ""
    config.model.require_autoencoder = False
    config.model.require_pretrained = False
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    config.flow.sample_steps = steps
    config.flow.cfg_scale = cfg_scale
    apply_overrides(config, overrides)
  config_base.validate(config)
  return config


def run(config_spec: str = "configs/t2i.py:smoke", *, batch: int = 8, steps: int = 50,
        cfg_scale: float = 6.5, warmup: int = 1, repeats: int = 3,
        overrides: tuple[str, ...] = (), out: str | None = None) -> dict:
  """Times T2ITask.generate on random weights; returns (and writes to `out`) the results."""
  import jax
  from flax import nnx

  from psvae_jax import data as data_lib
  from psvae_jax import sharding, train
  from psvae_jax import train_state as ts
  from psvae_jax.tasks import get_task

  config = sampling_config(config_spec, steps=steps, cfg_scale=cfg_scale, overrides=overrides)
  task = get_task(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh):
    layout = ts.make_train_setup(task, config, mesh)
    state = ts.init_state(task, config, layout)
    model = train.eval_model(layout, state, None)
    host_batch = data_lib.make_eval_batches(config.data, batch_size=batch, num_batches=1,
                                            seed=config.seed)[0]
    prepared = {k: v for k, v in task.prepare_batch(host_batch).items() if k != "image"}
    graphdef, params = nnx.split(model)
    generate = jax.jit(lambda p, b, rng: task.generate(nnx.merge(graphdef, p), b, rng))
    rng = jax.random.key(0)
    start = time.perf_counter()
    images = generate(params, prepared, rng).block_until_ready()
    compile_s = time.perf_counter() - start
    seconds, cpu = median_seconds(
        lambda: generate(params, prepared, rng).block_until_ready(), warmup, repeats)
  result = {
      "what": f"T2I Euler sampling, {steps} steps, CFG {cfg_scale:g} ({config_spec})",
      "config": config_spec, "overrides": list(overrides), "generator": config.model.generator, "batch": batch,
      "steps": steps, "cfg_scale": cfg_scale, "image_shape": list(images.shape[1:]),
      "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "compute_dtype": config.compute_dtype, "peak_memory_bytes": peak_memory_bytes(),
      "seconds_per_batch": seconds, "cpu_s_per_batch": cpu, "images_per_s": batch / seconds,
      "compile_s": compile_s, "load_average_1min": os.getloadavg()[0],
  }
  write_json(result, out)
  return result


def format_table(result: dict) -> str:
  return format_rows([("what", "batch", "s / batch", "images/s"),
                      (result["what"], str(result["batch"]), f"{result['seconds_per_batch']:.2f}",
                       f"{result['images_per_s']:.2f}")])


def parse_args(argv=None) -> argparse.Namespace:
  """This benchmark's command line."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/t2i.py:smoke")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--cfg_scale", type=float, default=6.5)
  add_timing_args(parser, warmup=1, repeats=3, overrides=True)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  result = run(args.config, batch=args.batch, steps=args.steps, cfg_scale=args.cfg_scale,
               warmup=args.warmup, repeats=args.repeats, overrides=tuple(args.set),
               out=args.out)
  print(format_table(result))
  print(f"compile {result['compile_s']:.1f}s, CPU s/batch {result['cpu_s_per_batch']:.2f}, "
        f"peak device memory {format_bytes(result['peak_memory_bytes'])}, "
        f"load average {result['load_average_1min']:.1f}")


if __name__ == "__main__":
  main()
