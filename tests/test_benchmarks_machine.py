"""The CPU description every CPU benchmark table carries (benchmarks/machine.py)."""
from benchmarks import machine

_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
"""


def test_model_and_vector_units_from_cpuinfo():
  info = machine.describe_cpu(_CPUINFO)
  assert info["model"] == "AMD EPYC"
  assert info["vector_flags"] == ["avx2", "fma"]
  assert machine.cpu_summary(info).startswith("AMD EPYC (avx2, fma), ")


def test_widest_units_listed_first():
  info = machine.describe_cpu("model name : Xeon\nflags : fma avx2 avx512f amx_tile\n")
  assert info["vector_flags"] == ["amx_tile", "avx512f", "avx2", "fma"]


def test_no_cpuinfo_still_describes_the_machine():
  info = machine.describe_cpu("")
  assert info["model"] and info["vector_flags"] == [] and info["cores"] >= 1
  assert "no AVX2" in machine.cpu_summary(info)
