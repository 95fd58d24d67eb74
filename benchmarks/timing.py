"""Shared timing and table helpers for the benchmarks (warm-up, repeats, median, CPU seconds)."""
from __future__ import annotations

import json
import os
import resource
import statistics
import time
from typing import Callable, Sequence


def cpu_seconds() -> float:
  """Process CPU seconds so far (user + system, all threads)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def add_timing_args(parser, *, warmup: int, repeats: int, overrides: bool = False,
                    out: str = "") -> None:
  """The flags every timed benchmark takes: --warmup, --repeats, (--set,) --out."""
  parser.add_argument("--warmup", type=int, default=warmup)
  parser.add_argument("--repeats", type=int, default=repeats)
  if overrides:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
  parser.add_argument("--out", default=out, help="write the result as JSON here")


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float]:
  """Median wall seconds per call of `fn` and median process CPU seconds per call.

  `fn` must block until its device work is done (call block_until_ready inside it).
  """
  for _ in range(warmup):
    fn()
  wall, cpu = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), cpu_seconds()
    fn()
    wall.append(time.perf_counter() - start)
    cpu.append(cpu_seconds() - start_cpu)
  return statistics.median(wall), statistics.median(cpu)


def peak_memory_bytes(device=None) -> int | None:
  """Peak bytes in use on `device` (default: the first) since the process started, or None
  where the backend keeps no memory statistics (the CPU backend)."""
  import jax

  stats = (device or jax.local_devices()[0]).memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])


def format_bytes(value: int | None) -> str:
  """'12.3 GiB', or '-' for None (no memory statistics)."""
  return "-" if value is None else f"{value / 2**30:.1f} GiB"


def format_rows(rows: Sequence[Sequence[str]]) -> str:
  """A plain-text table; the first row is the header."""
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
  lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(lines)


def write_json(result: dict, out: str | None) -> None:
  """Writes `result` as indented JSON to `out` (no-op when `out` is empty)."""
  if not out:
    return
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
