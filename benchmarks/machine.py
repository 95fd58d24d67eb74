"""What CPU a benchmark ran on: CPU-suite figures depend on the model and its vector units.

The same benchmark has given very different ratios on different 2-core machines (an AVX-512
Intel part and an AVX2-only AMD EPYC): the float32 matmul peak and which library reaches it
change with the vector units, so every CPU table names the machine.
"""
from __future__ import annotations

import os
import platform

# Vector-unit flags of /proc/cpuinfo worth naming, widest first.
_VECTOR_FLAGS = ("amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")


def _cpuinfo_field(text: str, key: str) -> str:
  for line in text.splitlines():
    name, _, value = line.partition(":")
    if name.strip() == key:
      return value.strip()
  return ""


def describe_cpu(cpuinfo: str | None = None) -> dict[str, object]:
  """{'model', 'vector_flags', 'cores'} of this machine (cpuinfo text from /proc/cpuinfo unless
  given). Where there is no flags line, e.g. macOS, vector_flags is None (unknown, not absent)
  and the model is platform.processor()."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      cpuinfo = ""
  flags_line = _cpuinfo_field(cpuinfo, "flags")
  flags = set(flags_line.split())
  model = _cpuinfo_field(cpuinfo, "model name") or platform.processor() or "unknown CPU"
  vector_flags = [f for f in _VECTOR_FLAGS if f in flags] if flags_line else None
  return {"model": model, "vector_flags": vector_flags, "cores": os.cpu_count() or 1}


def cpu_summary(info: dict[str, object]) -> str:
  """One line: 'AMD EPYC (avx2, fma), 2 cores'."""
  if info["vector_flags"] is None:
    flags = "vector units unknown"
  else:
    flags = ", ".join(info["vector_flags"]) or "no AVX2"
  return f"{info['model']} ({flags}), {info['cores']} cores"
