"""Throughput bookkeeping: peak FLOP/s per device and MFU.

Peaks are dense bf16 matmul figures from vendor datasheets for accelerators; on CPU (no
datasheet applies) the peak is measured once with a large matmul in the compute dtype.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device (per chip for TPU), by substring of device_kind; the first
# match wins, so the PCIe / NVL H100 variants come before the SXM figure.
PEAKS_BF16 = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
)


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype_name: str = "float32", n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an n^3 matmul on device 0 (median of repeats), the CPU's practical peak."""
  dtype = jnp.dtype(dtype_name)
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  times.sort()
  return 2 * n**3 / times[len(times) // 2]


def datasheet_peak(device_kind: str) -> float | None:
  """Dense bf16 datasheet peak FLOP/s of one device of this kind, or None if not tabulated."""
  for name, peak in PEAKS_BF16:
    if name.lower() in device_kind.lower():
      return peak
  return None


def peak_flops_per_device(configured: float = 0.0, dtype_name: str = "float32") -> float:
  """The configured peak, else a datasheet bf16 peak by device kind, else a measured CPU peak."""
  if configured and configured > 0:
    return float(configured)
  peak = datasheet_peak(jax.local_devices()[0].device_kind)
  if peak is not None:
    return peak
  # Simulated CPU devices share the same cores: each gets an equal part of the measured peak.
  return measured_matmul_peak(dtype_name) / jax.local_device_count()


def throughput(*, steps: int, seconds: float, batch_size: int, flops_per_example: float,
               peak_per_device: float) -> dict[str, float]:
  """steps/s, images/s, TFLOP/s per device and MFU for an interval of `steps` steps."""
  seconds = max(seconds, 1e-9)
  images_per_s = steps * batch_size / seconds
  flops_per_s_device = images_per_s * flops_per_example / jax.device_count()
  out = {"perf/steps_per_s": steps / seconds, "perf/images_per_s": images_per_s}
  if flops_per_example > 0:
    out["perf/tflops_per_device"] = flops_per_s_device / 1e12
    if peak_per_device > 0:
      out["perf/mfu"] = flops_per_s_device / peak_per_device
  return out
