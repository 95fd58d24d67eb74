"""The generator's attention implementations against a full-precision reference, and their speed.

  python -m benchmarks.attention_numerics [--batch=8] [--out=FILE.json]

The T2I shapes of the paper base generator (16 heads of 64, 128 padded text tokens + 256 image
tokens) and the edit shapes (+ 256 source tokens), with the models' own joint mask (per-example
text lengths). For bfloat16 and float32 inputs, 'xla' and 'cudnn' (cuDNN's fused kernel on a
GPU; elsewhere jax's XLA version of the same function, named in the output) are compared with
the 'xla' path in float32 at Precision.HIGHEST: the largest absolute error of the output and of
the q/k/v gradients (through a fixed random output cotangent), each relative to the reference's
largest magnitude, and the forward + backward time. Part of `python -m benchmarks.run
--suite=gpu_paper`.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import add_timing_args, format_rows, median_seconds, write_json
from psvae_jax.models import attention, mmdit

HEADS, HEAD_DIM, TEXT, IMAGE = 16, 64, 128, 256
SHAPES = {"t2i": TEXT + IMAGE, "edit": TEXT + 2 * IMAGE}
DTYPES = ("bfloat16", "float32")
IMPLS = ("xla", "cudnn")


def _inputs(batch: int, length: int, seed: int = 0):
  """q, k, v, an output cotangent (float32) and the joint mask with padded text."""
  keys = jax.random.split(jax.random.key(seed), 5)
  shape = (batch, length, HEADS, HEAD_DIM)
  q, k, v, cot = (jax.random.normal(key, shape, jnp.float32) for key in keys[:4])
  text_len = jax.random.randint(keys[4], (batch,), 1, TEXT + 1)
  text_mask = jnp.arange(TEXT)[None, :] < text_len[:, None]
  mask = mmdit.joint_attention_mask(TEXT, length - TEXT, text_mask=text_mask)
  return q, k, v, cot, mask


def _out_and_grads(impl: str, mask, q, k, v, cot):
  fn = functools.partial(attention.dot_product_attention, mask=mask, impl=impl)
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cot.astype(out.dtype)))


def _max_relative_error(values, reference) -> float:
  """The largest |value - reference| over all arrays, each relative to its reference's largest
  magnitude."""
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
             for x, r in zip(values, reference))


def measure(batch: int, warmup: int, repeats: int) -> list[dict]:
  """One record per (shape, dtype, implementation)."""
  records = []
  backend = jax.default_backend()
  for shape, length in SHAPES.items():
    q, k, v, cot, mask = _inputs(batch, length)
    with jax.default_matmul_precision("highest"):
      reference = jax.jit(functools.partial(_out_and_grads, "xla", mask))(q, k, v, cot)
    for dtype in DTYPES:
      args = [x.astype(dtype) for x in (q, k, v)] + [cot]
      for impl in IMPLS:
        step = jax.jit(functools.partial(_out_and_grads, impl, mask))
        values = step(*args)
        seconds, _ = median_seconds(lambda: jax.block_until_ready(step(*args)), warmup,
                                    repeats)
        records.append({
            "shape": shape, "tokens": length, "dtype": dtype, "impl": impl,
            "kernel": "cudnn" if impl == "cudnn" and backend == "gpu" else "xla",
            "output_error": _max_relative_error(values[:1], reference[:1]),
            "grad_error": _max_relative_error(values[1:], reference[1:]),
            "fwd_bwd_ms": 1e3 * seconds})
  return records


def rows(records: list[dict]) -> list[tuple[str, ...]]:
  table = [("shape", "tokens", "dtype", "impl (kernel)", "output error", "grad error",
            "fwd+bwd ms")]
  for r in records:
    table.append((r["shape"], str(r["tokens"]), r["dtype"], f"{r['impl']} ({r['kernel']})",
                  f"{r['output_error']:.1e}", f"{r['grad_error']:.1e}", f"{r['fwd_bwd_ms']:.2f}"))
  return table


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  add_timing_args(parser, warmup=2, repeats=10)
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  records = measure(args.batch, args.warmup, args.repeats)
  print(format_rows(rows(records)))
  device = jax.devices()[0].device_kind
  write_json({"what": "attention implementations vs float32 HIGHEST reference",
              "device_kind": device, "batch": args.batch, "records": records}, args.out)


if __name__ == "__main__":
  main()
