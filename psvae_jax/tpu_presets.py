"""Settings for launching the paper configs on TPU slices: presets `tpu_v5p` and `tpu_v6e`
(`configs/psvae.py:tpu_v5p`, `configs/t2i.py:tpu_v6e`, `configs/t2i.py:large_tpu_v5p`, ...).

Every TPU preset computes in bfloat16 with float32 master weights and optimizer state (the
MXU's native input type; float32 matmuls take several passes), and runs attention with the
splash kernel (at the T2I base shapes the cost model gives it 1.0 ms a layer against 2.75 ms
for 'xla': benchmarks/tpu_attention_cost.py). Per stage and chip:
  psvae  no remat (the paper batch fits with room to spare on v5p and v6e); splash for the
         encoders' attention: 0.078 s a step on v5p:2x2x2 against 0.082 s with 'xla' (which
         writes out every 261 x 261 logit matrix). On 64 chips batch 96 does not divide by
         the chip count: add --config.mesh.tensor=4 (16-way data x 4-way tensor; the conv
         networks then split image rows over `tensor`).
  t2i    global batch 768 (the paper's 730 rounded up to divide 8..256-way data parallelism).
         v5p (95 GiB HBM): plain data parallelism, the generator's float32 state copied on
         every chip (31 GiB a chip for the base model on 16 chips), no remat. FSDP there made
         the compiler gather every weight in loops re-reading the activations: 26% estimated
         MFU against 46% on v5p:2x2x4 (benchmarks/RESULTS.md, tpu_aot). On 64 chips and more
         (12 examples a chip) FSDP is ahead instead: add --config.mesh.data=1
         --config.mesh.fsdp=-1 (base on v5p:4x4x4: 37% against 30%).
         v6e (32 GiB HBM): FSDP over every chip (the state is spread, not copied) and remat
         'dots' (keep matmul outputs, recompute the rest).
Layer scan stays off: it shortens compilation, not the step (a scanned step is a loop whose
weights are sliced each layer).
"""
from __future__ import annotations

import ml_collections

CHIPS = ("v5p", "v6e")
_T2I_REMAT = {"v5p": "", "v6e": "dots"}
# (data, fsdp) of the generator's mesh: -1 = every chip.
_T2I_MESH = {"v5p": (-1, 1), "v6e": (1, -1)}


def split(preset: str) -> tuple[str, str]:
  """'large_tpu_v5p' -> ('large', 'v5p'); 'tpu_v6e' -> ('', 'v6e'); other presets -> (preset, '')."""
  base, sep, chip = preset.rpartition("tpu_")
  if not sep or (base and not base.endswith("_")):
    return preset, ""
  if chip not in CHIPS:
    raise ValueError(f"unknown TPU preset {preset!r}: the chip must be one of {CHIPS}")
  return base.removesuffix("_"), chip


def apply(c: ml_collections.ConfigDict, chip: str) -> None:
  """Sets config `c` (a psvae or t2i config) up for `chip` (see the module docstring)."""
  if chip not in CHIPS:
    raise ValueError(f"unknown TPU chip {chip!r}; known: {CHIPS}")
  c.compute_dtype = "bfloat16"
  c.attention_impl = "splash"
  if c.task == "psvae":
    c.model.remat = False
  elif c.task == "t2i":
    c.batch_size = 768
    (c.mesh.data, c.mesh.fsdp), c.mesh.tensor = _T2I_MESH[chip], 1
    c.model.remat_policy = _T2I_REMAT[chip]
  else:
    raise ValueError(f"no TPU preset for task {c.task!r}")
