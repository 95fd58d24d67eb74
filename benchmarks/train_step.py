"""Training-step throughput of any stage, through the loop's own step (images/s, FLOP/s, MFU).

  python -m benchmarks.train_step --config=configs/psvae.py:smoke [--batch=8] [--repeats=5] \
      [--set=model.remat=True ...] [--synthetic_cached] [--out=benchmarks/out/train_step_psvae.json]

Builds the stage's task and layout exactly as `train.py` does (one device unless --devices),
initialises the state with the jitted sharded init, feeds a real batch of the config's data
source through `task.prepare_batch`, and times `train.make_train_step` jitted with the loop's
shardings and donation: warm-up calls, then `repeats` timed calls (each blocks on the new state),
median. FLOP/s comes from the task's analytic `flops_per_example` and MFU from
config.logging.peak_flops_per_device if set, else the datasheet peak of an accelerator or the
measured matmul peak of this machine (psvae_jax.perf) in the config's compute dtype. The peak
device memory is reported where the backend keeps memory statistics (GPU, TPU).

--synthetic_cached (T2I with --set=model.cached_inputs=True): random latents and text states of
the model's shapes instead of the config's data, so no data source or latent cache is needed
and the frozen encoders are not in the step (as in training from a cache).
"""
from __future__ import annotations

import argparse
import ast
import os
import time

import numpy as np

from benchmarks.timing import (add_timing_args, format_bytes, format_rows, median_seconds,
                               peak_memory_bytes, write_json)


def apply_overrides(config, overrides) -> None:
  """Sets each 'dotted.key=value' of `overrides` on the unlocked `config` (value parsed as a
  Python literal, else kept as a string)."""
  from psvae_jax.config_loader import set_by_path

  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ValueError(f"config override {item!r} is not KEY=VALUE")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw  # a plain string
    set_by_path(config, key, value)


def synthetic_cached_batch(task, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A prepared batch of random cached inputs (T2I latents, text states, full text masks)."""
  if not (hasattr(task, "cached_shapes") and task.config.model.get("cached_inputs", False)):
    raise ValueError(f"--synthetic_cached needs a task with cached inputs and "
                     f"config.model.cached_inputs=True (task {task.config.task!r}); pass "
                     f"--set=model.cached_inputs=True with a T2I config")
  shapes = task.cached_shapes(batch_size)
  rng = np.random.default_rng(seed)
  batch = {k: rng.standard_normal(shapes[k], dtype=np.float32)
           for k in ("latent", "text_states")}
  batch["text_mask"] = np.ones(shapes["text_mask"], np.int32)
  return task.prepare_batch(batch)  # checks the shapes as for a real cache


def benchmark_config(config_spec: str, *, batch: int = 0, overrides: tuple[str, ...] = ()):
  """The validated config the step is timed with: no init checkpoint (random weights of the
  same shapes), data-parallel mesh, `batch` (0 = the config's) and `overrides` applied."""
  from psvae_jax import config_base
  from psvae_jax.config_loader import load_config

  config = load_config(config_spec)
  with config.unlocked():
    config.init = ""
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    if batch:
      config.batch_size = batch
    apply_overrides(config, overrides)
  config_base.validate(config)
  return config


def run(config_spec: str, *, batch: int = 0, devices: int = 1, warmup: int = 2,
        repeats: int = 5, overrides: tuple[str, ...] = (), synthetic_cached: bool = False,
        out: str | None = None) -> dict:
  """Times the stage's training step; returns (and writes to `out`) the results."""
  import jax

  from psvae_jax import perf, sharding, train
  from psvae_jax import data as data_lib
  from psvae_jax import train_state as ts
  from psvae_jax.tasks import get_task

  config = benchmark_config(config_spec, batch=batch, overrides=overrides)
  task = get_task(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  with jax.set_mesh(mesh):
    layout = ts.make_train_setup(task, config, mesh)
    start = time.perf_counter()
    state = ts.init_state(task, config, layout)
    ema = ts.init_ema(state, layout)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    if synthetic_cached:
      prepared = synthetic_cached_batch(task, config.batch_size, config.seed)
    else:
      host_batch = data_lib.make_eval_batches(config.data, batch_size=config.batch_size,
                                              num_batches=1, seed=config.seed)[0]
      prepared = task.prepare_batch(host_batch)
    step_batch = sharding.host_local_to_global(prepared, mesh)
    step_fn = train.jit_train_step(task, layout, config)
    holder = {"state": state, "ema": ema}

    def one_step():
      holder["state"], holder["ema"], metrics = step_fn(holder["state"], holder["ema"],
                                                        step_batch)
      jax.block_until_ready((holder["state"], metrics))

    start = time.perf_counter()
    one_step()
    compile_s = time.perf_counter() - start
    seconds, cpu = median_seconds(one_step, warmup, repeats)

  flops = float(task.flops_per_example())
  peak = perf.peak_flops_per_device(config.logging.peak_flops_per_device,
                                    config.compute_dtype) * devices
  images_per_s = config.batch_size / seconds
  achieved = images_per_s * flops
  result = {
      "what": f"{config.task} training step ({config_spec})",
      "config": config_spec, "overrides": list(overrides), "batch": config.batch_size,
      "devices": devices, "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind, "compute_dtype": config.compute_dtype,
      "synthetic_cached": synthetic_cached,
      "trainable_params": ts.num_params(holder["state"]["params"]),
      "step_s": seconds, "cpu_s_per_step": cpu, "images_per_s": images_per_s,
      "init_s": init_s, "compile_s": compile_s, "flops_per_example": flops,
      "achieved_flops_per_s": achieved, "peak_flops_per_s": peak,
      "mfu": achieved / peak if peak else None, "peak_memory_bytes": peak_memory_bytes(),
      "load_average_1min": os.getloadavg()[0],
  }
  write_json(result, out)
  return result


def format_table(result: dict) -> str:
  rows = [("what", "batch", "step s", "images/s", "GFLOP/s", "MFU"),
          (result["what"], str(result["batch"]), f"{result['step_s']:.3f}",
           f"{result['images_per_s']:.2f}", f"{result['achieved_flops_per_s'] / 1e9:.1f}",
           f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "-")]
  return format_rows(rows)


def parse_args(argv=None) -> argparse.Namespace:
  """This benchmark's command line."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/psvae.py:smoke")
  parser.add_argument("--batch", type=int, default=0, help="0 = the config's batch_size")
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--synthetic_cached", action="store_true",
                      help="random cached T2I inputs instead of the config's data")
  add_timing_args(parser, warmup=2, repeats=5, overrides=True)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  result = run(args.config, batch=args.batch, devices=args.devices, warmup=args.warmup,
               repeats=args.repeats, overrides=tuple(args.set),
               synthetic_cached=args.synthetic_cached, out=args.out)
  print(format_table(result))
  print(f"compile {result['compile_s']:.1f}s, init {result['init_s']:.1f}s, CPU s/step "
        f"{result['cpu_s_per_step']:.2f}, peak device memory "
        f"{format_bytes(result['peak_memory_bytes'])}, load average "
        f"{result['load_average_1min']:.1f}")


if __name__ == "__main__":
  main()
