"""Ahead-of-time compiles a stage's real training step for a TPU slice, from any machine.

  python -m psvae_jax.tools.aot --config=configs/<stage>.py[:preset] --topology=v5p:2x2x4 \
      [--config.a.b=value ...]

The step is the one `train.py` runs (`train.jit_train_step` on the layout and shardings of
`train_state.make_train_setup`: the same shardings and donation), lowered on abstract
arguments (no memory is allocated, no TPU is needed: only `libtpu`'s compiler). Prints ONE JSON
line with the per-chip memory XLA assigned (arguments, outputs, temporaries, aliased donations),
the chip's HBM, whether it fits, and XLA's cost-model FLOPs and time estimate.

Topologies: `FAMILY:SHAPE` with FAMILY in v4, v5p, v5e (alias v5litepod), v6e and SHAPE the chip
grid (AxBxC for v4/v5p, AxB for v5e/v6e), e.g. v4:2x2x2, v5p:2x2x4, v5e:4x4, v6e:2x4; or a Cloud
accelerator type, e.g. v5p-32 (= v5p:2x2x4; v4/v5p count TensorCores, two per chip), v6e-16.
The mesh comes from `config.mesh` (-1 = fill) over the slice's chips. Multi-slice: `--slices=N
--config.mesh.dcn_data=N` compiles for N such slices joined by the data-centre network.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from psvae_jax.errors import UserError

GIB = 1024**3


class TopologyError(UserError, ValueError):
  """The --topology string is not a TPU slice this tool knows."""


class LibTpuMissing(UserError, RuntimeError):
  """libtpu (the TPU compiler) is not installed."""


@dataclasses.dataclass(frozen=True)
class Chip:
  family: str
  hbm_bytes: int
  peak_bf16_flops: float  # dense bf16 FLOP/s per chip (datasheet)
  dims: int  # 3 = 3D torus (AxBxC), 2 = 2D (AxB)
  megacore: bool  # two TensorCores presented as one device


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 3, True),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 2, False),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 3, True),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 2, False),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}

# Cloud accelerator type -> chip grid. v4/v5p names count TensorCores (2 per chip).
_ACCELERATOR_TYPES_3D = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4",
                         256: "4x4x8", 512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16",
                         4096: "8x16x16"}
_ACCELERATOR_TYPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8",
                         128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A parsed TPU slice: chip family, chip grid and the arguments libtpu's topology needs."""
  spec: str
  chip: Chip
  shape: tuple[int, ...]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.family}:{'x'.join(map(str, self.shape))}"

  def libtpu_kwargs(self) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"chip_config_name": "megacore" if self.chip.megacore else "default"}
    if self.chip.dims == 3:
      # Slices of 4x4x4 chips and more are closed into a torus (wraparound links).
      wrap = all(s >= 4 for s in self.shape)
      kwargs.update(chips_per_host_bounds=(2, 2, 1), wrap=(wrap,) * 3)
    else:
      x, y = self.shape
      if self.chips <= 8:  # single-host v5e/v6e machines: 1, 4 or 8 chips on one host
        kwargs["chips_per_host_bounds"] = (x, y, 1)
      else:
        kwargs["chips_per_host_bounds"] = (2, 2, 1)
        kwargs["wrap"] = (x == 16, y == 16, False)
    return kwargs


def parse_topology(spec: str) -> Topology:
  """'v5p:2x2x4', 'v5e:4x4', 'v5litepod-16', 'v5p-32', ... -> Topology; raises TopologyError."""
  text = spec.strip().lower()
  known = "known chip families: " + ", ".join(sorted(CHIPS)) + " (v5litepod = v5e)"
  example = "e.g. v4:2x2x2, v5p:2x2x4, v5e:4x4, v6e:2x4 or v5p-32, v6e-16"
  match = re.fullmatch(r"(v[0-9a-z]+)([:-])([0-9x]+)", text)
  if not match:
    raise TopologyError(f"--topology={spec!r} is not FAMILY:AxBxC or an accelerator type "
                        f"({example})")
  family, sep, rest = match.groups()
  family = _ALIASES.get(family, family)
  if family not in CHIPS:
    raise TopologyError(f"--topology={spec!r}: unknown TPU family {family!r}; {known}")
  chip = CHIPS[family]
  if sep == "-":
    if not rest.isdigit():
      raise TopologyError(f"--topology={spec!r}: accelerator types end in a number ({example})")
    count = int(rest)
    table = _ACCELERATOR_TYPES_3D if chip.dims == 3 else _ACCELERATOR_TYPES_2D
    if count not in table:
      raise TopologyError(f"--topology={spec!r}: no known slice {family}-{count}; known sizes: "
                          f"{sorted(table)}, or give the chip grid ({example})")
    rest = table[count]
  try:
    shape = tuple(int(s) for s in rest.split("x"))
  except ValueError:
    raise TopologyError(f"--topology={spec!r}: bad chip grid {rest!r} ({example})") from None
  if len(shape) != chip.dims or any(s < 1 for s in shape):
    grid = "AxBxC" if chip.dims == 3 else "AxB"
    raise TopologyError(f"--topology={spec!r}: {family} slices are a {chip.dims}D chip grid "
                        f"{grid} of positive sizes ({example})")
  return Topology(spec, chip, shape)


def libtpu_requirement() -> str:
  """The libtpu pin of the installed jax's `tpu` extra (e.g. 'libtpu==0.0.42.*')."""
  for req in importlib.metadata.requires("jax") or []:
    if req.startswith("libtpu") and "tpu" in req.split(";", 1)[-1]:
      return req.split(";", 1)[0].strip()
  return "libtpu"


def topology_devices(topology: Topology, num_slices: int = 1) -> list:
  """The compile-only TPU devices (one per chip) of `num_slices` such slices from libtpu;
  nothing is attached."""
  if importlib.util.find_spec("libtpu") is None:
    import jax
    raise LibTpuMissing(
        "libtpu (the TPU compiler) is not installed; AOT compilation for TPU needs it. Install "
        f"the version this jax pins: pip install '{libtpu_requirement()}' (or pip install "
        f"'jax[tpu]=={jax.__version__}'); it does not change the CPU backend")
  from jax.experimental import topologies
  # Compile-only use touches no TPU: do not take libtpu's one-process-per-host lock, so several
  # AOT runs (or one beside a CPU training run) can share a machine.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(topology.libtpu_name, "tpu", num_slices=num_slices,
                                        **topology.libtpu_kwargs())
  except Exception as e:  # libtpu reports bad layouts as JaxRuntimeError / RuntimeError
    raise TopologyError(f"--topology={topology.spec!r}: libtpu refused slice "
                        f"{topology.libtpu_name} {topology.libtpu_kwargs()}: {e}") from e
  devices = list(desc.devices)
  if len(devices) != topology.chips * num_slices:
    raise TopologyError(f"--topology={topology.spec!r}: libtpu gave {len(devices)} devices for "
                        f"{num_slices} x {topology.chips} chips")
  return devices


def _example_source(config, override: str) -> str:
  if override:
    return override
  if config.data.source.startswith("synthetic:"):
    return config.data.source
  return "synthetic:edits" if config.task == "edit" else "synthetic:shapes"


def abstract_batch(task, config, mesh, example_source: str = "") -> dict:
  """The step's global batch as ShapeDtypeStructs sharded like the loop's batches.

  Shapes come from one real example of a synthetic source with the config's data settings
  (image size, ...) passed through `task.prepare_batch`, so they are exactly what the loop feeds
  the step; the dataset itself (TFDS, GCS shards) need not be reachable.
  """
  import jax
  import numpy as np

  from psvae_jax import data as data_lib
  from psvae_jax import sharding

  data_config = config.data.copy_and_resolve_references()
  with data_config.unlocked():
    data_config.source = _example_source(config, example_source)
    data_config.eval_source = ""
    data_config.eval_size = 2
    data_config.synthetic_size = 2
  example = data_lib.make_eval_batches(data_config, batch_size=1, num_batches=1,
                                       seed=config.seed)[0]
  prepared = task.prepare_batch(example)
  batch = {}
  for key, value in prepared.items():
    value = np.asarray(value)
    shape = (config.batch_size,) + value.shape[1:]
    batch[key] = jax.ShapeDtypeStruct(shape, value.dtype,
                                      sharding=sharding.batch_sharding(mesh, value.ndim))
  return batch


def compile_train_step(config, devices, example_source: str = ""):
  """(compiled step, mesh, task) of `config`'s training step over `devices` (abstract args)."""
  import jax

  from psvae_jax import config_base, sharding, train
  from psvae_jax import train_state as ts
  from psvae_jax.tasks import get_task

  config_base.validate(config, platform=devices[0].platform)
  task = get_task(config)
  try:
    mesh = sharding.make_mesh(config.mesh, devices)
  except sharding.MeshError as e:
    raise sharding.MeshError(f"{e} (the slice has {len(devices)} chips; set config.mesh to "
                             "sizes whose product is the chip count, one of them may be -1)") from e
  dp = sharding.data_parallel_size(mesh)
  if config.batch_size % dp:
    raise config_base.ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by the data-parallel size {dp} "
        f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
  with jax.set_mesh(mesh):
    layout = ts.make_train_setup(task, config, mesh)
    batch = abstract_batch(task, config, mesh, example_source)
  # Built outside the mesh context: it makes concrete host constants (the base RNG key), which
  # cannot be placed on compile-only devices.
  step_fn = train.jit_train_step(task, layout, config)
  with jax.set_mesh(mesh):
    compiled = step_fn.lower(layout.abstract_state, layout.abstract_ema, batch).compile()
  return compiled, mesh, task


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def fit_report(config, config_spec: str, topology: Topology, compiled, mesh, task,
               margin: float = 0.05, with_breakdown: bool = False) -> dict[str, Any]:
  """The JSON-able summary: per-chip memory, HBM, fits, cost-model FLOPs and time (also
  corrected for loops), and with `with_breakdown` the FLOPs / traffic / collectives per source
  (`hlo_breakdown`)."""
  mem = compiled.memory_analysis()
  arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
  code = mem.generated_code_size_in_bytes
  # Donated state aliases its output buffers: those bytes are counted once.
  total = arg + out + temp + code - alias
  hbm = topology.chip.hbm_bytes
  cost = _cost(compiled)
  flops = cost.get("flops")
  report: dict[str, Any] = {
      "config": config_spec,
      "task": config.task,
      "topology": topology.spec,
      "libtpu_topology": topology.libtpu_name,
      "chip": topology.chip.family,
      "chips": mesh.size,
      "slices": mesh.size // topology.chips,
      "mesh": dict(mesh.shape),
      "batch_size": config.batch_size,
      "compute_dtype": config.compute_dtype,
      "remat": bool(config.model.get("remat", False)) if "model" in config else False,
      "argument_bytes": arg,
      "output_bytes": out,
      "temp_bytes": temp,
      "alias_bytes": alias,
      "generated_code_bytes": code,
      "total_bytes": total,
      "total_gib": round(total / GIB, 3),
      "hbm_bytes": hbm,
      "hbm_gib": hbm / GIB,
      "margin": margin,
      "fits": total <= (1.0 - margin) * hbm,
      "flops_per_chip": flops,
      "bytes_accessed_per_chip": cost.get("bytes accessed"),
      "est_step_time_s": _step_time_estimate(cost),
      # The compute-bound floor: cost-model FLOPs at the chip's dense bf16 peak.
      "min_step_time_s_at_peak": flops / topology.chip.peak_bf16_flops if flops else None,
  }
  from psvae_jax.tools import hlo_breakdown
  counts = hlo_breakdown.breakdown(compiled.as_text())
  report.update(_loop_correction(counts, report["est_step_time_s"]))
  if with_breakdown:
    report["breakdown"] = counts
  analytic = task.flops_per_example()
  if analytic:
    report["analytic_flops_per_chip"] = analytic * config.batch_size / mesh.size
    # Estimated MFU: the useful (analytic) FLOPs in the (loop-corrected) cost-model time at
    # the bf16 peak; est_mfu_xla with XLA's own time.
    for key, time_key in (("est_mfu", "est_step_time_s_loops"),
                          ("est_mfu_xla", "est_step_time_s")):
      seconds = report[time_key]
      report[key] = (report["analytic_flops_per_chip"] / seconds /
                     topology.chip.peak_bf16_flops) if seconds else None
  return report


def _loop_correction(counts: dict, xla_seconds: float | None) -> dict[str, Any]:
  """XLA's cost analysis (FLOPs and time) counts a while loop's body once, however often it
  runs; the TPU compiler turns FSDP's weight gathers into such loops (windowed einsums), and
  layer scan is one. The dot/convolution FLOPs counted as XLA does and as they run
  (`hlo_breakdown`), and the cost-model time scaled by their ratio: the work it did not see,
  at the efficiency of the work it did. `counts`: `hlo_breakdown.breakdown` of the step."""
  loops = counts["loops"]
  run = sum(counts["flops"].values())
  once = run - loops["flops_in_bodies_run"] + loops["flops_in_bodies_once"]
  scale = run / once if once else 1.0
  return {"while_loops": loops["count"], "dot_flops_per_chip": run,
          "dot_flops_per_chip_counted_by_xla": once,
          "est_step_time_s_loops": xla_seconds * scale if xla_seconds else None}


def _step_time_estimate(cost: dict) -> float | None:
  """The cost model's step time, or None where it has none: for a multi-slice step (traffic
  over the data-centre network) libtpu's model gives a negative time."""
  seconds = cost.get("optimal_seconds")
  return seconds if seconds is not None and seconds > 0 else None


# --- command line --------------------------------------------------------------------------

_FLAGS: dict = {}


def define_flags() -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", None, "Stage config file[:preset].", lock_config=True)
  _FLAGS["topology"] = flags.DEFINE_string(
      "topology", None, "TPU slice, e.g. v5p:2x2x4, v5e:4x4, v6e-8.")
  _FLAGS["slices"] = flags.DEFINE_integer(
      "slices", 1, "Number of such slices (multi-slice job; set --config.mesh.dcn_data to it).")
  _FLAGS["out"] = flags.DEFINE_string("out", "", "Also write the JSON report to this file.")
  _FLAGS["breakdown"] = flags.DEFINE_bool(
      "breakdown", False, "Add the per-source FLOPs and collective bytes of the compiled HLO "
      "(psvae_jax.tools.hlo_breakdown) to the report.")
  _FLAGS["hlo_out"] = flags.DEFINE_string(
      "hlo_out", "", "Also write the compiled step's optimised HLO text to this file (input of "
      "python -m psvae_jax.tools.hlo_breakdown).")
  _FLAGS["margin"] = flags.DEFINE_float(
      "margin", 0.05, "Fraction of HBM kept free when deciding `fits`.")
  _FLAGS["example_source"] = flags.DEFINE_string(
      "example_source", "", "Synthetic data source whose example gives the batch shapes ('' = "
      "the config's source if synthetic, else synthetic:shapes, or synthetic:edits for the "
      "edit task).")

def _config_spec(argv) -> str:
  for arg in argv:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return ""


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax
  # Only the compiler is needed: keep the runtime on CPU (no attempt to attach a local TPU).
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  from psvae_jax.config_base import ConfigError
  from psvae_jax.sharding import MeshError
  config = _FLAGS["config"].value
  try:
    topology = parse_topology(_FLAGS["topology"].value)
    devices = topology_devices(topology, _FLAGS["slices"].value)
    start = time.perf_counter()
    compiled, mesh, task = compile_train_step(config, devices, _FLAGS["example_source"].value)
    compile_s = time.perf_counter() - start
  except (TopologyError, LibTpuMissing, MeshError, ConfigError) as e:
    sys.exit(f"error: {e}")
  report = fit_report(config, _config_spec(sys.argv), topology, compiled, mesh, task,
                      _FLAGS["margin"].value, with_breakdown=_FLAGS["breakdown"].value)
  report["compile_s"] = round(compile_s, 1)
  if _FLAGS["hlo_out"].value:
    with open(_FLAGS["hlo_out"].value, "w") as f:
      f.write(compiled.as_text())
  line = json.dumps(report)
  print(line, flush=True)
  if _FLAGS["out"].value:
    with open(_FLAGS["out"].value, "w") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
