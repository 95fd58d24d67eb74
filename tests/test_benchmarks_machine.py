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
  """Without a flags line the vector units are unknown: the summary must not claim 'no AVX2'."""
  info = machine.describe_cpu("")
  assert info["model"] and info["vector_flags"] is None and info["cores"] >= 1
  assert "vector units unknown" in machine.cpu_summary(info)
  assert "no AVX2" not in machine.cpu_summary(info)


def test_flags_without_avx2_say_so():
  info = machine.describe_cpu("model name : Old\nflags : fpu sse sse2 avx\n")
  assert info["vector_flags"] == []
  assert machine.cpu_summary(info).startswith("Old (no AVX2), ")
