"""Euler sampling throughput of the T2I generator with classifier-free guidance (images/s).

  python -m benchmarks.sampling [--config=configs/t2i.py:smoke] [--batch=8] [--steps=50] \
      [--cfg_scale=6.5] [--repeats=3] [--out=benchmarks/out/sampling.json]

Random weights of the config's shapes (no checkpoint needed). One jitted call runs the whole
sampler: text encoding, `steps` Euler steps of the MMDiT on the doubled (unconditional +
conditional) batch, and the PS-VAE pixel decoder, as `T2ITask.generate` does during training.
Timed: warm-up, then `repeats` calls with block_until_ready, median.
"""
from __future__ import annotations

import argparse
import os
import time

from benchmarks.timing import format_rows, median_seconds, write_json


def run(config_spec: str = "configs/t2i.py:smoke", *, batch: int = 8, steps: int = 50,
        cfg_scale: float = 6.5, warmup: int = 1, repeats: int = 3,
        out: str | None = None) -> dict:
  """Times T2ITask.generate on random weights; returns (and writes to `out`) the results."""
  import jax
  from flax import nnx

  from psvae_jax import data as data_lib
  from psvae_jax import sharding, train
  from psvae_jax import train_state as ts
  from psvae_jax.config_loader import load_config
  from psvae_jax.tasks import get_task

  config = load_config(config_spec)
  with config.unlocked():
    config.init = ""
    config.model.require_autoencoder = False
    config.model.require_pretrained = False
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    config.flow.sample_steps = steps
    config.flow.cfg_scale = cfg_scale
  task = get_task(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh):
    layout = ts.make_layout(task, config, mesh)
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
      "config": config_spec, "generator": config.model.generator, "batch": batch,
      "steps": steps, "cfg_scale": cfg_scale, "image_shape": list(images.shape[1:]),
      "backend": jax.default_backend(), "compute_dtype": config.compute_dtype,
      "seconds_per_batch": seconds, "cpu_s_per_batch": cpu, "images_per_s": batch / seconds,
      "compile_s": compile_s, "load_average_1min": os.getloadavg()[0],
  }
  write_json(result, out)
  return result


def format_table(result: dict) -> str:
  return format_rows([("what", "batch", "s / batch", "images/s"),
                      (result["what"], str(result["batch"]), f"{result['seconds_per_batch']:.2f}",
                       f"{result['images_per_s']:.2f}")])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/t2i.py:smoke")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--cfg_scale", type=float, default=6.5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  result = run(args.config, batch=args.batch, steps=args.steps, cfg_scale=args.cfg_scale,
               warmup=args.warmup, repeats=args.repeats, out=args.out)
  print(format_table(result))
  print(f"compile {result['compile_s']:.1f}s, CPU s/batch {result['cpu_s_per_batch']:.2f}, "
        f"load average {result['load_average_1min']:.1f}")


if __name__ == "__main__":
  main()
