"""Runs every benchmark of a suite and prints one table (it and each benchmark's JSON: --out).

  python -m benchmarks.run [--suite=cpu] [--out=benchmarks/out] [--quick] [--only=NAME,NAME]
  python -m benchmarks.run --suite=gpu_paper [--out=benchmarks/out_gpu] [--batch=64] \
      [--peak_tflops=N] [--set=attention_impl=cudnn ...]
  python -m benchmarks.run --suite=tpu_aot [--only=psvae|t2i|t2i_large] [--set=attention_impl=splash]

Suites (SUITES): 'cpu' (default) compares this project with the reference libraries at small
sizes on this machine; 'gpu_paper' measures the paper-scale models on one accelerator (see
below); 'tpu_aot' compiles the paper configs' TPU presets (configs/psvae.py:tpu_v5p,
configs/t2i.py:tpu_v5p, configs/t2i.py:large_tpu_v5p) for two v5p slice sizes each from this
machine (psvae_jax.tools.aot, libtpu needed, 5-15 min per compile on 2 cores) and prints
per-chip memory, fits, XLA's and the analytic FLOPs, XLA's cost-model step time (an estimate,
not a measurement), the estimated MFU (analytic FLOPs / estimated time / the chip's bf16 peak)
and the compile time; --only=psvae (or t2i, t2i_large, psvae_v5p_8, ...) runs a subset.

Each benchmark runs as its own process (`python -m benchmarks.<module> ...`, its log and JSON
under --out), so one benchmark's threads and compilation caches do not disturb the next. The
table has one row per measurement: what, this project, the reference (transformers, diffusers
+ torch AdamW, or for the input pipeline the fastest training step's consumption rate), their
ratio, the ratio's ceiling, achieved FLOP/s and MFU against this machine's measured float32
matmul peak (or the accelerator's datasheet peak). The ceiling is the ratio this project would
reach if it ran every counted FLOP at that peak (the peak over the reference's achieved
FLOP/s): a comparison target above it would need more than the machine's matmul peak.
The CPU table names the CPU (model, vector units): its ratios depend on them. A benchmark that
fails is reported and makes the command exit non-zero; the others still run.

--suite=gpu_paper, on one device of the accelerator it runs on (per-device figures):
  t2i_step    the T2I training step of configs/t2i.py (base MMDiT ~650M incl. the DDT head),
              bf16 compute with float32 master weights (compute_dtype), random cached latents
              and text states (model.cached_inputs: the frozen encoders are not in the step),
              --batch per device (default 64; the paper's global batch is 730);
  psvae_step  the PS-VAE stage-2 training step of configs/psvae.py, bf16, the paper's batch 96
              on one device, synthetic 256 px images;
  sampling    50 Euler steps with CFG 6.5 of the same T2I generator plus the pixel decoder,
              bf16, 64 captions;
  attention_numerics  'xla' and 'cudnn' attention on the generator's T2I and edit shapes with
              its padded-text mask, bf16 and float32, against a float32 HIGHEST reference
              (output and gradient errors, forward + backward time; a second table).
The table gives step time, images/s, achieved TFLOP/s (the tasks' analytic FLOP counts), MFU
against the device's dense bf16 datasheet peak (psvae_jax.perf, by jax device_kind; an
accelerator not in that table is an error unless --peak_tflops is given) and the peak device
memory. Target: T2I (MMDiT) step MFU >= 45% in bf16 on H100. --set forwards config overrides to
the config-driven benchmarks (train_step, sampling).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.machine import cpu_summary, describe_cpu
from benchmarks.timing import format_bytes, format_rows, write_json

# name -> (module, arguments, arguments with --quick). The JSON path is appended by `run_one`.
# The 'cpu' suite.
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
# The paper-scale models on one accelerator (module docstring). The randomly initialised frozen
# parts (text encoder, PS-VAE) need no checkpoints: require_* off, byte tokens.
_PAPER_T2I = ["--config=configs/t2i.py", "--set=compute_dtype=bfloat16",
              "--set=model.require_autoencoder=False", "--set=model.require_pretrained=False",
              "--set=model.tokenizer=bytes"]
GPU_PAPER_BENCHMARKS = {
    "t2i_step": ("benchmarks.train_step",
                 [*_PAPER_T2I, "--set=model.cached_inputs=True", "--synthetic_cached",
                  "--batch=64", "--warmup=2", "--repeats=10"],
                 ["--warmup=1", "--repeats=3"]),
    "psvae_step": ("benchmarks.train_step",
                   ["--config=configs/psvae.py", "--set=compute_dtype=bfloat16",
                    "--set=model.require_pretrained_encoder=False",
                    "--set=data.source=synthetic:shapes", "--batch=96", "--warmup=2",
                    "--repeats=5"],
                   ["--warmup=1", "--repeats=2"]),
    "sampling": ("benchmarks.sampling",
                 [*_PAPER_T2I, "--set=data.source=synthetic:shapes", "--batch=64",
                  "--steps=50", "--cfg_scale=6.5", "--warmup=1", "--repeats=3"],
                 ["--repeats=1", "--steps=10"]),
    "attention_numerics": ("benchmarks.attention_numerics", ["--batch=8"],
                           ["--warmup=1", "--repeats=3"]),
}


def _tpu_aot(config: str, topology: str, *overrides: str) -> tuple[str, list[str], list[str]]:
  """An ahead-of-time TPU compile (psvae_jax.tools.aot) of a paper config's real train step."""
  return ("psvae_jax.tools.aot", [f"--config={config}", f"--topology={topology}",
                                  "--breakdown", *overrides], [])


# The paper configs' TPU presets compiled for two v5p slice sizes each (from this machine).
_T2I_AOT = ("--config.model.tokenizer=bytes",)  # shapes only: no tokenizer files needed
TPU_AOT_BENCHMARKS = {
    "psvae_v5p_8": _tpu_aot("configs/psvae.py:tpu_v5p", "v5p:2x2x2"),
    "psvae_v5p_64": _tpu_aot("configs/psvae.py:tpu_v5p", "v5p:4x4x4", "--config.mesh.tensor=4"),
    "t2i_v5p_16": _tpu_aot("configs/t2i.py:tpu_v5p", "v5p:2x2x4", *_T2I_AOT),
    "t2i_v5p_64": _tpu_aot("configs/t2i.py:tpu_v5p", "v5p:4x4x4", *_T2I_AOT),
    "t2i_large_v5p_16": _tpu_aot("configs/t2i.py:large_tpu_v5p", "v5p:2x2x4", *_T2I_AOT),
    "t2i_large_v5p_64": _tpu_aot("configs/t2i.py:large_tpu_v5p", "v5p:4x4x4", *_T2I_AOT),
}
SUITES = {"cpu": BENCHMARKS, "gpu_paper": GPU_PAPER_BENCHMARKS, "tpu_aot": TPU_AOT_BENCHMARKS}
DEFAULT_OUT = {"cpu": os.path.join("benchmarks", "out"),
               "gpu_paper": os.path.join("benchmarks", "out_gpu"),
               "tpu_aot": os.path.join("benchmarks", "out_tpu_aot")}
# The flag each benchmark takes for its JSON output.
_JSON_FLAG = {"mmdit_step": "--json"}
# Benchmarks that take --set config overrides.
_CONFIG_MODULES = ("benchmarks.train_step", "benchmarks.sampling")
# Training steps whose consumption rate the input pipeline must outrun.
_CONSUMERS = ("psvae_step", "t2i_step")
MFU_TARGET = 0.45  # T2I (MMDiT) training step, bf16, H100


def command(name: str, out_dir: str, quick: bool, suite: str = "cpu",
            extra_args: tuple[str, ...] = ()) -> list[str]:
  """The command line of benchmark `name` of `suite`; `extra_args` come last (they win)."""
  module, args, quick_args = SUITES[suite][name]
  json_path = os.path.join(out_dir, f"{name}.json")
  # TPU compiles also keep their optimised HLO: the FLOP breakdown can be recounted from it
  # without another 10-40 min compile.
  hlo = ([f"--hlo_out={os.path.join(out_dir, f'{name}.hlo')}"]
         if module == "psvae_jax.tools.aot" else [])
  return [sys.executable, "-m", module, *args, *(quick_args if quick else []), *hlo, *extra_args,
          f"{_JSON_FLAG.get(name, '--out')}={json_path}"]


def extra_arguments(name: str, suite: str, *, batch: int = 0, peak_flops: float = 0.0,
                    overrides: tuple[str, ...] = ()) -> tuple[str, ...]:
  """Arguments run.py's own flags add to benchmark `name`: --batch (T2I step only), the peak
  FLOP/s and --set overrides (config-driven benchmarks only)."""
  module = SUITES[suite][name][0]
  extra = []
  if batch and name == "t2i_step":
    extra.append(f"--batch={batch}")
  if module in _CONFIG_MODULES:
    if peak_flops and module == "benchmarks.train_step":
      extra.append(f"--set=logging.peak_flops_per_device={peak_flops!r}")
    extra.extend(f"--set={item}" for item in overrides)
  elif module == "psvae_jax.tools.aot":
    extra.extend(f"--config.{item}" for item in overrides)
  return tuple(extra)


def accelerator_peak(device_kind: str, peak_tflops: float = 0.0) -> float:
  """Dense bf16 peak FLOP/s of one device: --peak_tflops if given, else the datasheet figure
  for `device_kind`; an untabulated kind is an error."""
  from psvae_jax import perf

  if peak_tflops < 0:
    raise ValueError(f"--peak_tflops={peak_tflops} must be positive")
  if peak_tflops:
    return peak_tflops * 1e12
  peak = perf.datasheet_peak(device_kind)
  if peak is None:
    known = ", ".join(name for name, _ in perf.PEAKS_BF16)
    raise ValueError(f"no datasheet bf16 peak for device kind {device_kind!r} (known: {known}); "
                     f"--suite=gpu_paper is meant for an accelerator: pass "
                     f"--peak_tflops=<dense bf16 TFLOP/s of one device> to run it anyway")
  return peak


def probe_device() -> tuple[str, str, int]:
  """(backend, device_kind, device count) from a short subprocess, so that this process never
  holds accelerator memory while the benchmarks run."""
  code = ("import jax; d = jax.devices(); "
          "print(jax.default_backend(), len(d), d[0].device_kind, sep='\t')")
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                       text=True).stdout
  backend, count, kind = out.strip().splitlines()[-1].split("\t", 2)
  return backend, kind, int(count)


def run_one(name: str, out_dir: str, quick: bool, suite: str = "cpu",
            extra_args: tuple[str, ...] = ()) -> tuple[dict | None, str]:
  """Runs benchmark `name` of `suite` in a subprocess; returns (its JSON or None, error text)."""
  json_path = os.path.join(out_dir, f"{name}.json")
  log_path = os.path.join(out_dir, f"{name}.log")
  if os.path.exists(json_path):
    os.remove(json_path)  # never report a stale result
  cmd = command(name, out_dir, quick, suite, extra_args)
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


def common_cpu_peak(peak: float, results: dict[str, dict]) -> float:
  """The highest of the float32 matmul peaks measured by this process and by each benchmark's
  own process: a peak is a capability, so a lower reading is timing noise (another job on the
  CPU), and every MFU in one table is then against the same figure."""
  readings = [peak]
  for r in results.values():
    readings += [r[k] for k in ("measured_matmul_peak_flops_per_s", "peak_flops_per_s")
                 if r.get(k)]
  return max(readings)


def ratio_ceiling(reference_flops_per_s: float, peak: float) -> float:
  """The highest ratio (this project's rate over the reference's, same work) possible on a
  machine whose matmul peak is `peak`: this project at the peak against the reference as
  measured."""
  return peak / reference_flops_per_s


def table_rows(results: dict[str, dict], peak: float) -> list[tuple[str, ...]]:
  """One row per measurement from the benchmarks' JSON results (ceiling and MFU against
  `peak`)."""
  rows = [("what", "this project", "reference", "ratio", "ceiling", "achieved", "MFU")]
  ceiling = lambda reference_flops: f"{ratio_ceiling(reference_flops, peak):.2f}x"
  r = results.get("encoder_forward")
  if r:
    achieved = r["jax_images_per_s"] * r["flops_per_image"]
    rows.append((f"encoder forward DINOv2-B/14 b{r['batch']} vs transformers",
                 _fmt_rate(r["jax_images_per_s"], "img/s"),
                 _fmt_rate(r["torch_images_per_s"], "img/s"), f"{r['ratio']:.2f}x",
                 ceiling(r["torch_images_per_s"] * r["flops_per_image"]),
                 _fmt_flops(achieved), _fmt_fraction(achieved / peak)))
  r = results.get("mmdit_step")
  if r:
    rows.append((f"MMDiT train step {r['layers']}L w{r['width']} b{r['batch']} vs diffusers",
                 _fmt_rate(r["jax_steps_per_s"], "step/s"),
                 _fmt_rate(r["torch_steps_per_s"], "step/s"), f"{r['ratio']:.2f}x",
                 ceiling(r["torch_flops_per_s"]), _fmt_flops(r["jax_flops_per_s"]),
                 _fmt_fraction(r["jax_flops_per_s"] / peak)))
  for name in _CONSUMERS:
    r = results.get(name)
    if r:
      rows.append((f"{r['what']} b{r['batch']}", _fmt_rate(r["images_per_s"], "img/s"), "-",
                   "-", "-", _fmt_flops(r["achieved_flops_per_s"]),
                   _fmt_fraction(r["achieved_flops_per_s"] / peak)))
  r = results.get("sampling")
  if r:
    rows.append((f"T2I sampling {r['steps']} Euler steps CFG {r['cfg_scale']:g} b{r['batch']}",
                 _fmt_rate(r["images_per_s"], "img/s"), "-", "-", "-", "-", "-"))
  r = results.get("input_pipeline")
  if r:
    rates = r["images_per_s"]
    best_name = max(rates, key=lambda k: rates[k] if "raw" not in k else -1)
    consumers = [results[n]["images_per_s"] for n in _CONSUMERS if results.get(n)]
    need = max(consumers) if consumers else None
    rows.append((f"input pipeline {r['image_size']} px ({best_name}) vs fastest step",
                 _fmt_rate(rates[best_name], "img/s"), _fmt_rate(need, "img/s"),
                 f"{rates[best_name] / need:.2f}x" if need else "-", "-", "-", "-"))
  return rows


def paper_rows(results: dict[str, dict]) -> list[tuple[str, ...]]:
  """One row per benchmark of the gpu_paper suite (per-device figures)."""
  rows = [("what", "batch/device", "s / step (batch)", "images/s", "achieved", "MFU",
           "peak memory")]
  tflops = lambda v: "-" if v is None else f"{v / 1e12:.1f} TFLOP/s"
  for name in ("t2i_step", "psvae_step"):
    r = results.get(name)
    if r:
      rows.append((r["what"], str(r["batch"]), f"{r['step_s']:.3f}",
                   _fmt_rate(r["images_per_s"], "img/s"), tflops(r["achieved_flops_per_s"]),
                   _fmt_fraction(r["mfu"]), format_bytes(r["peak_memory_bytes"])))
  r = results.get("sampling")
  if r:
    rows.append((r["what"], str(r["batch"]), f"{r['seconds_per_batch']:.3f}",
                 _fmt_rate(r["images_per_s"], "img/s"), "-", "-",
                 format_bytes(r["peak_memory_bytes"])))
  return rows


def tpu_aot_rows(results: dict[str, dict]) -> list[tuple[str, ...]]:
  """One row per compiled step of the tpu_aot suite (per chip; times are XLA's cost model, and
  'est.' columns correct it for the loop bodies it counts once: see tools.aot)."""
  rows = [("step", "slice", "mesh", "batch", "memory/chip", "fits", "XLA TFLOP", "dot TFLOP",
           "analytic", "est. s/step", "est. MFU", "XLA s/step", "XLA MFU", "compile")]
  seconds = lambda v: "-" if v is None else f"{v:.3f}"
  for name, r in results.items():
    mesh = "x".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    analytic = r.get("analytic_flops_per_chip")
    dots = r.get("dot_flops_per_chip")
    rows.append((r["config"].split("/")[-1], r["topology"], mesh, str(r["batch_size"]),
                 f"{r['total_gib']:.1f} GiB", "yes" if r["fits"] else "NO",
                 f"{r['flops_per_chip'] / 1e12:.2f}",
                 "-" if dots is None else f"{dots / 1e12:.2f}",
                 "-" if analytic is None else f"{analytic / 1e12:.2f}",
                 seconds(r.get("est_step_time_s_loops")), _fmt_fraction(r.get("est_mfu")),
                 seconds(r["est_step_time_s"]),
                 _fmt_fraction(r.get("est_mfu_xla", r.get("est_mfu"))),
                 f"{r['compile_s']:.0f} s"))
  return rows


def parse_args(argv=None) -> argparse.Namespace:
  """run.py's command line; unknown suites, benchmarks and misplaced flags are errors."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--suite", default="cpu", choices=list(SUITES),
                      help="cpu: vs the reference libraries, small sizes; gpu_paper: the "
                      "paper-scale models on one accelerator; tpu_aot: TPU compiles of the "
                      "paper presets (cost-model estimates)")
  parser.add_argument("--out", default="",
                      help=f"output folder (default by suite: {DEFAULT_OUT})")
  parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
  parser.add_argument("--only", default="", help="comma-separated subset of the suite's "
                      f"benchmarks ({ {k: list(v) for k, v in SUITES.items()} })")
  parser.add_argument("--batch", type=int, default=0,
                      help="per-device batch of the T2I training step (t2i_step); default: "
                      "the suite's (cpu: the smoke config's 16, gpu_paper: 64)")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="gpu_paper: dense bf16 peak TFLOP/s of one device (default: the "
                      "datasheet figure for its device kind; required for an unknown one)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for the config-driven benchmarks (repeatable)")
  args = parser.parse_args(argv)
  benchmarks = SUITES[args.suite]
  # --only takes names or their leading words ('psvae' = psvae_v5p_8 and psvae_v5p_64).
  wanted = [n for n in args.only.split(",") if n]
  picks = lambda w: [n for n in benchmarks if n == w or n.startswith(w + "_")]
  args.names = [n for n in benchmarks if any(n in picks(w) for w in wanted)] or list(benchmarks)
  unknown = [w for w in wanted if not picks(w)]
  if unknown:
    parser.error(f"unknown benchmark(s) {unknown} in suite {args.suite!r}; known: "
                 f"{list(benchmarks)}")
  if args.batch < 0:
    parser.error(f"--batch={args.batch} must be positive")
  if args.peak_tflops and args.suite != "gpu_paper":
    parser.error("--peak_tflops applies to --suite=gpu_paper only (the cpu suite measures its "
                 "peak)")
  bad = [item for item in args.set if "=" not in item]
  if bad:
    parser.error(f"--set takes KEY=VALUE, got {bad}")
  args.out = args.out or DEFAULT_OUT[args.suite]
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.suite == "gpu_paper":
    backend, kind, count = probe_device()
    try:
      peak = accelerator_peak(kind, args.peak_tflops)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    machine = (f"{kind} ({backend}, {count} device(s) visible, 1 used), dense bf16 peak "
               f"{peak / 1e12:.0f} TFLOP/s" + (" (--peak_tflops)" if args.peak_tflops else
                                                " (datasheet)"))
  elif args.suite == "tpu_aot":
    kind, peak = "TPU (compile only)", 0.0
    machine = ("compiled on this host for TPU slices; times are XLA's cost-model estimates, "
               "not measurements")
  else:
    import jax

    from psvae_jax import perf
    kind = jax.devices()[0].device_kind
    peak = perf.peak_flops_per_device(0.0, "float32")
  os.makedirs(args.out, exist_ok=True)
  results, errors = {}, {}
  for name in args.names:
    extra = extra_arguments(name, args.suite, batch=args.batch,
                            peak_flops=peak if args.suite == "gpu_paper" else 0.0,
                            overrides=tuple(args.set))
    result, error = run_one(name, args.out, args.quick, args.suite, extra)
    if result is None:
      errors[name] = error
    else:
      results[name] = result
  cpu = None
  if args.suite == "gpu_paper":
    rows = paper_rows(results)
  elif args.suite == "tpu_aot":
    rows = tpu_aot_rows(results)
  else:
    peak = common_cpu_peak(peak, results)
    cpu = describe_cpu()
    machine = (f"{cpu_summary(cpu)}; peak: {peak / 1e9:.1f} GFLOP/s (highest measured float32 "
               f"matmul)")
    rows = table_rows(results, peak)
  print(format_rows(rows))
  if results.get("attention_numerics"):
    from benchmarks import attention_numerics
    print(format_rows(attention_numerics.rows(results["attention_numerics"]["records"])))
  print(f"{machine}, load average {os.getloadavg()[0]:.1f}")
  t2i = results.get("t2i_step")
  if args.suite == "gpu_paper" and t2i and t2i["mfu"] is not None:
    verdict = "meets" if t2i["mfu"] >= MFU_TARGET else "below"
    print(f"T2I step MFU {100 * t2i['mfu']:.1f}%: {verdict} the target "
          f">= {100 * MFU_TARGET:.0f}% (bf16, H100)")
  for name, error in errors.items():
    print(f"FAILED {name}: {error}", file=sys.stderr)
  write_json({"suite": args.suite, "rows": rows, "peak_flops_per_s": peak, "device_kind": kind,
              "cpu": cpu,
              "mfu_target": MFU_TARGET if args.suite == "gpu_paper" else None,
              "results": results, "errors": errors,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
             os.path.join(args.out, "summary.json"))
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
