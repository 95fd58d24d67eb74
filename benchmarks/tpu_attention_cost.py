"""What XLA's TPU cost model makes of the generator's attention, splash kernel against 'xla'.

  python -m benchmarks.tpu_attention_cost [--topology=v5p:2x2x1] [--per_chip_batch=48]

Compiles (from any host with libtpu, nothing runs) the forward + backward of one attention call
at the paper base generator's shapes (16 heads of 64, 256 text tokens with per-example padding
+ 256 image tokens; edit: + 256 source tokens), bf16, the batch split over the slice's chips,
with `attention_impl` 'xla' and 'splash', and prints XLA's cost analysis per chip: FLOPs, bytes
accessed, the cost-model time, and the analytic attention FLOPs (3x the forward's two matmuls,
the convention of the steps' MFU) over that time as a fraction of the chip's bf16 peak. The splash kernel is a custom
call whose FLOPs XLA does not count; the table shows what time the cost model gives it anyway,
which is what `tools.aot`'s estimated step times and MFU of splash steps rest on. All figures
are XLA's estimates, not measurements.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from benchmarks.timing import format_rows, write_json
from psvae_jax.models import attention, mmdit
from psvae_jax.tools import aot

HEADS, HEAD_DIM, TEXT, IMAGE = 16, 64, 256, 256
SHAPES = {"t2i": IMAGE, "edit": 2 * IMAGE}  # tokens after the text
IMPLS = ("xla", "splash")


def _loss(impl: str, image_len: int, q, k, v, text_len):
  text_mask = jnp.arange(TEXT)[None, :] < text_len[:, None]
  mask = mmdit.joint_attention_mask(TEXT, image_len, text_mask=text_mask)
  out = attention.dot_product_attention(q, k, v, mask=mask, impl=impl)
  return jnp.sum(out.astype(jnp.float32) ** 2)


def analytic_flops(batch: int, tokens: int) -> float:
  """Useful attention FLOPs of forward + backward: 3x the forward's q k^T and p v (2 x 2 b h n^2 d),
  as the training steps' analytic count (a kernel's recomputed logits are not counted)."""
  return 3 * 2 * 2 * batch * HEADS * tokens ** 2 * HEAD_DIM


def measure(topology: str, per_chip_batch: int) -> list[dict]:
  """Compiles each (shape, impl) for `topology` and returns XLA's per-chip cost analysis."""
  spec = aot.parse_topology(topology)
  devices = aot.topology_devices(spec)
  mesh = jax.sharding.Mesh(np.array(devices).reshape(len(devices), 1, 1),
                           ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  batch = per_chip_batch * len(devices)
  by_batch = NamedSharding(mesh, P("data"))
  records = []
  for shape, image_len in SHAPES.items():
    tokens = TEXT + image_len
    qkv = jax.ShapeDtypeStruct((batch, tokens, HEADS, HEAD_DIM), jnp.bfloat16, sharding=by_batch)
    text_len = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=by_batch)
    for impl in IMPLS:
      step = jax.jit(jax.grad(functools.partial(_loss, impl, image_len), argnums=(0, 1, 2)))
      start = time.perf_counter()
      with jax.set_mesh(mesh):
        compiled = step.lower(qkv, qkv, qkv, text_len).compile()
      cost = aot._cost(compiled)  # pylint: disable=protected-access
      seconds = cost.get("optimal_seconds")
      useful = analytic_flops(per_chip_batch, tokens)
      records.append({
          "shape": shape, "tokens": tokens, "impl": impl, "topology": topology,
          "per_chip_batch": per_chip_batch, "xla_flops": cost.get("flops"),
          "bytes_accessed": cost.get("bytes accessed"), "est_seconds": seconds,
          "analytic_flops": useful,
          "est_fraction_of_peak": (useful / seconds / spec.chip.peak_bf16_flops
                                   if seconds and seconds > 0 else None),
          "compile_s": round(time.perf_counter() - start, 1)})
  return records


def rows(records: list[dict]) -> list[tuple[str, ...]]:
  """The printed table."""
  table = [("shape", "tokens", "impl", "XLA GFLOP", "analytic GFLOP", "GB accessed",
            "est. ms", "analytic / est. ms / peak")]
  for r in records:
    fraction = r["est_fraction_of_peak"]
    table.append((r["shape"], str(r["tokens"]), r["impl"], f"{r['xla_flops'] / 1e9:.1f}",
                  f"{r['analytic_flops'] / 1e9:.1f}", f"{r['bytes_accessed'] / 1e9:.2f}",
                  f"{r['est_seconds'] * 1e3:.2f}" if r["est_seconds"] else "-",
                  f"{fraction:.0%}" if fraction else "-"))
  return table


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topology", default="v5p:2x2x1")
  parser.add_argument("--per_chip_batch", type=int, default=48,
                      help="examples per chip (48: batch 768 on 16 chips)")
  parser.add_argument("--out", default="", help="write the records as JSON here")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  records = measure(args.topology, args.per_chip_batch)
  print(format_rows(rows(records)))
  write_json({"what": "XLA TPU cost analysis of attention fwd+bwd, splash vs xla",
              "records": records}, args.out)


if __name__ == "__main__":
  main()
