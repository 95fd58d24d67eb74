"""Runs every benchmark and prints one table; writes it (and each benchmark's JSON) to --out.

  python -m benchmarks.run [--out=benchmarks/out] [--quick] [--only=NAME,NAME]

Each benchmark runs as its own process (`python -m benchmarks.<module> ...`, its log and JSON
under --out), so one benchmark's threads and compilation caches do not disturb the next. The
table has one row per measurement: what, this project, the reference (transformers, diffusers
+ torch AdamW, or for the input pipeline the fastest training step's consumption rate), their
ratio, achieved FLOP/s and MFU against this machine's measured float32 matmul peak (or the
accelerator's datasheet peak). A benchmark that fails is reported and makes the command exit
non-zero; the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.timing import format_rows, write_json

# name -> (module, arguments, arguments with --quick). The JSON path is appended by `run_one`.
BENCHMARKS = {
    "encoder_forward": ("benchmarks.encoder_forward", [], ["--repeats=3", "--warmup=1"]),
    "mmdit_step": ("benchmarks.mmdit_step", [], ["--repeats=3", "--warmup=1"]),
    "psvae_step": ("benchmarks.train_step", ["--config=configs/psvae.py:smoke"],
                   ["--repeats=2", "--warmup=1"]),
    "t2i_step": ("benchmarks.train_step",
                 ["--config=configs/t2i.py:smoke", "--set=model.require_autoencoder=False"],
                 ["--repeats=2", "--warmup=1"]),
    "sampling": ("benchmarks.sampling", [], ["--repeats=1", "--steps=10"]),
    "input_pipeline": ("benchmarks.input_pipeline", [], ["--repeats=2", "--batches=3"]),
}
# The flag each benchmark takes for its JSON output.
_JSON_FLAG = {"mmdit_step": "--json"}
# Training steps whose consumption rate the input pipeline must outrun.
_CONSUMERS = ("psvae_step", "t2i_step")


def run_one(name: str, out_dir: str, quick: bool) -> tuple[dict | None, str]:
  """Runs benchmark `name` in a subprocess; returns (its JSON or None, error text)."""
  module, args, quick_args = BENCHMARKS[name]
  json_path = os.path.join(out_dir, f"{name}.json")
  log_path = os.path.join(out_dir, f"{name}.log")
  if os.path.exists(json_path):
    os.remove(json_path)  # never report a stale result
  cmd = [sys.executable, "-m", module, *args, *(quick_args if quick else []),
         f"{_JSON_FLAG.get(name, '--out')}={json_path}"]
  start = time.perf_counter()
  with open(log_path, "w") as log:
    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
  seconds = time.perf_counter() - start
  print(f"[{name}] exit {rc} after {seconds:.0f} s (log: {log_path})", flush=True)
  if rc != 0 or not os.path.exists(json_path):
    with open(log_path) as f:
      tail = f.read()[-1500:]
    return None, f"exit code {rc}: {tail}"
  with open(json_path) as f:
    return json.load(f), ""


def _fmt_rate(value, unit: str) -> str:
  return "-" if value is None else f"{value:.2f} {unit}"


def _fmt_flops(value) -> str:
  return "-" if value is None else f"{value / 1e9:.1f} GFLOP/s"


def _fmt_fraction(value) -> str:
  return "-" if value is None else f"{100 * value:.1f}%"


def table_rows(results: dict[str, dict], peak: float) -> list[tuple[str, ...]]:
  """One row per measurement from the benchmarks' JSON results."""
  rows = [("what", "this project", "reference", "ratio", "achieved", "MFU")]
  r = results.get("encoder_forward")
  if r:
    achieved = r["jax_images_per_s"] * r["flops_per_image"]
    rows.append((f"encoder forward DINOv2-B/14 b{r['batch']} vs transformers",
                 _fmt_rate(r["jax_images_per_s"], "img/s"),
                 _fmt_rate(r["torch_images_per_s"], "img/s"), f"{r['ratio']:.2f}x",
                 _fmt_flops(achieved), _fmt_fraction(achieved / peak)))
  r = results.get("mmdit_step")
  if r:
    rows.append((f"MMDiT train step {r['layers']}L w{r['width']} b{r['batch']} vs diffusers",
                 _fmt_rate(r["jax_steps_per_s"], "step/s"),
                 _fmt_rate(r["torch_steps_per_s"], "step/s"), f"{r['ratio']:.2f}x",
                 _fmt_flops(r["jax_flops_per_s"]), _fmt_fraction(r["jax_fraction_of_peak"])))
  for name in _CONSUMERS:
    r = results.get(name)
    if r:
      rows.append((f"{r['what']} b{r['batch']}", _fmt_rate(r["images_per_s"], "img/s"), "-",
                   "-", _fmt_flops(r["achieved_flops_per_s"]), _fmt_fraction(r["mfu"])))
  r = results.get("sampling")
  if r:
    rows.append((f"T2I sampling {r['steps']} Euler steps CFG {r['cfg_scale']:g} b{r['batch']}",
                 _fmt_rate(r["images_per_s"], "img/s"), "-", "-", "-", "-"))
  r = results.get("input_pipeline")
  if r:
    rates = r["images_per_s"]
    best_name = max(rates, key=lambda k: rates[k] if "raw" not in k else -1)
    consumers = [results[n]["images_per_s"] for n in _CONSUMERS if results.get(n)]
    need = max(consumers) if consumers else None
    rows.append((f"input pipeline {r['image_size']} px ({best_name}) vs fastest step",
                 _fmt_rate(rates[best_name], "img/s"), _fmt_rate(need, "img/s"),
                 f"{rates[best_name] / need:.2f}x" if need else "-", "-", "-"))
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join("benchmarks", "out"))
  parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
  parser.add_argument("--only", default="", help=f"comma-separated subset of {list(BENCHMARKS)}")
  args = parser.parse_args(argv)
  names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    parser.error(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
  os.makedirs(args.out, exist_ok=True)

  import jax

  from psvae_jax import perf
  peak = perf.peak_flops_per_device(0.0, "float32")
  results, errors = {}, {}
  for name in names:
    result, error = run_one(name, args.out, args.quick)
    if result is None:
      errors[name] = error
    else:
      results[name] = result
  rows = table_rows(results, peak)
  print(format_rows(rows))
  print(f"peak: {peak / 1e9:.1f} GFLOP/s ({jax.devices()[0].device_kind}, measured float32 "
        f"matmul on CPU), cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
  for name, error in errors.items():
    print(f"FAILED {name}: {error}", file=sys.stderr)
  write_json({"rows": rows, "peak_flops_per_s": peak, "device_kind": jax.devices()[0].device_kind,
              "results": results, "errors": errors,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
             os.path.join(args.out, "summary.json"))
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
