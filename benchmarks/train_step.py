"""Training-step throughput of any stage, through the loop's own step (images/s, FLOP/s, MFU).

  python -m benchmarks.train_step --config=configs/psvae.py:smoke [--batch=8] [--repeats=5] \
      [--set=model.remat=True ...] [--out=benchmarks/out/train_step_psvae.json]

Builds the stage's task and layout exactly as `train.py` does (one device unless --devices),
initialises the state with the jitted sharded init, feeds a real batch of the config's data
source through `task.prepare_batch`, and times `train.make_train_step` jitted with the loop's
shardings and donation: warm-up calls, then `repeats` timed calls (each blocks on the new state),
median. FLOP/s comes from the task's analytic `flops_per_example` and MFU from the measured matmul
peak of this machine (psvae_jax.perf) in the config's compute dtype, or the datasheet peak of an
accelerator.
"""
from __future__ import annotations

import argparse
import ast
import os
import time

from benchmarks.timing import format_rows, median_seconds, write_json


def run(config_spec: str, *, batch: int = 0, devices: int = 1, warmup: int = 2,
        repeats: int = 5, overrides: tuple[str, ...] = (), out: str | None = None) -> dict:
  """Times the stage's training step; returns (and writes to `out`) the results."""
  import jax

  from psvae_jax import config_base, perf, sharding, train
  from psvae_jax import data as data_lib
  from psvae_jax import train_state as ts
  from psvae_jax.config_loader import load_config, set_by_path
  from psvae_jax.tasks import get_task

  config = load_config(config_spec)
  with config.unlocked():
    # No init checkpoints in a benchmark: random weights of the same shapes.
    config.init = ""
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    if batch:
      config.batch_size = batch
    for item in overrides:
      key, _, raw = item.partition("=")
      try:
        value = ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        value = raw  # a plain string
      set_by_path(config, key, value)
  config_base.validate(config)
  task = get_task(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  with jax.set_mesh(mesh):
    layout = ts.make_layout(task, config, mesh)
    start = time.perf_counter()
    state = ts.init_state(task, config, layout)
    ema = ts.init_ema(state, layout)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    host_batch = data_lib.make_eval_batches(config.data, batch_size=config.batch_size,
                                            num_batches=1, seed=config.seed)[0]
    step_batch = sharding.host_local_to_global(task.prepare_batch(host_batch), mesh)
    step_fn = jax.jit(train.make_train_step(task, layout, config),
                      in_shardings=(layout.state_shardings, layout.ema_shardings, None),
                      out_shardings=(layout.state_shardings, layout.ema_shardings, None),
                      donate_argnums=(0, 1))
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
  peak = perf.peak_flops_per_device(0.0, config.compute_dtype) * devices
  images_per_s = config.batch_size / seconds
  achieved = images_per_s * flops
  result = {
      "what": f"{config.task} training step ({config_spec})",
      "config": config_spec, "overrides": list(overrides), "batch": config.batch_size,
      "devices": devices, "backend": jax.default_backend(), "compute_dtype": config.compute_dtype,
      "trainable_params": ts.num_params(holder["state"]["params"]),
      "step_s": seconds, "cpu_s_per_step": cpu, "images_per_s": images_per_s,
      "init_s": init_s, "compile_s": compile_s, "flops_per_example": flops,
      "achieved_flops_per_s": achieved, "peak_flops_per_s": peak,
      "mfu": achieved / peak if peak else None, "load_average_1min": os.getloadavg()[0],
  }
  write_json(result, out)
  return result


def format_table(result: dict) -> str:
  rows = [("what", "batch", "step s", "images/s", "GFLOP/s", "MFU"),
          (result["what"], str(result["batch"]), f"{result['step_s']:.3f}",
           f"{result['images_per_s']:.2f}", f"{result['achieved_flops_per_s'] / 1e9:.1f}",
           f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "-")]
  return format_rows(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/psvae.py:smoke")
  parser.add_argument("--batch", type=int, default=0, help="0 = the config's batch_size")
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override (repeatable)")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  result = run(args.config, batch=args.batch, devices=args.devices, warmup=args.warmup,
               repeats=args.repeats, overrides=tuple(args.set), out=args.out)
  print(format_table(result))
  print(f"compile {result['compile_s']:.1f}s, init {result['init_s']:.1f}s, CPU s/step "
        f"{result['cpu_s_per_step']:.2f}, load average {result['load_average_1min']:.1f}")


if __name__ == "__main__":
  main()
