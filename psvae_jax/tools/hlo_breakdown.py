"""Where a compiled step's FLOPs and collectives go, read from its optimised HLO text.

  python -m psvae_jax.tools.hlo_breakdown FILE.hlo      (the text of `compiled.as_text()`)

Every dot and convolution (fused or not) is counted as 2 x output elements x contraction size
(padding taps included, so convolutions on small maps read a little high) and attributed to
the innermost file of this project on its stack (the module's StackFrames table):
models/lpips.py, models/pixel_decoder.py, ... Collectives are counted with their output bytes. Loop bodies are
counted once (the autoencoder steps have no scanned layers); per chip, as the HLO is.
"""
from __future__ import annotations

import collections
import math
import os
import re
import sys

_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(?[a-z0-9]+\[[^\]]*\][^ ]*)\s+(\w[\w\-]*)\(")
_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_OPERANDS = re.compile(r"\(([^)]*)\)")
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_FILE_NAME = re.compile(r'^(\d+) "(.*)"$')
_FILE_LOCATION = re.compile(r"^(\d+) \{file_name_id=(\d+)")
_STACK_FRAME = re.compile(r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
          "f64": 8, "s64": 8, "u64": 8}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _dims(shape_text: str) -> list[int]:
  match = _SHAPE.search(shape_text)
  return [int(d) for d in match.group(2).split(",") if d] if match else []


def _nbytes(shape_text: str) -> int:
  return sum(_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for t, dims in _SHAPE.findall(shape_text))


class _Stacks:
  """The HLO module's FileNames / FileLocations / StackFrames tables: frame id -> files."""

  def __init__(self, lines: list[str]):
    self.files, self.locations, self.frames = {}, {}, {}
    section = ""
    for line in lines:
      if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
        section = line
        continue
      if not line.strip() or line.startswith(("%", "HloModule", "ENTRY")):
        section = "" if not line.strip() else section
        continue
      if section == "FileNames" and (m := _FILE_NAME.match(line)):
        self.files[m.group(1)] = m.group(2)
      elif section == "FileLocations" and (m := _FILE_LOCATION.match(line)):
        self.locations[m.group(1)] = m.group(2)
      elif section == "StackFrames" and (m := _STACK_FRAME.match(line)):
        # The text gives the parent as its id + 1 (0 = no parent): frame 9 with
        # parent_frame_id=9 is called from frame 8.
        self.frames[m.group(1)] = (m.group(2), str(int(m.group(3)) - 1))

  def source(self, line: str) -> str:
    """The innermost psvae_jax file (as models/lpips.py) on the op's stack, else '(other)'."""
    match = _FRAME_ID.search(line)
    frame, seen = (match.group(1) if match else None), set()
    while frame in self.frames and frame not in seen:
      seen.add(frame)
      location, parent = self.frames[frame]
      path = self.files.get(self.locations.get(location, ""), "")
      parts = path.split(os.sep)
      if "psvae_jax" in parts and not path.endswith("sharding.py"):
        return os.sep.join(parts[parts.index("psvae_jax") + 1:])
      frame = parent
    return "(other)"


def _flops(op: str, out_dims: list[int], line: str, shapes: dict[str, list[int]]) -> float:
  operands = [o.strip().split(" ")[-1].lstrip("%") for o in
              _OPERANDS.search(line[line.index(op + "("):]).group(1).split(",")]
  if op == "dot":
    lhs = shapes.get(operands[0], [])
    match = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
    contract = math.prod(lhs[int(i)] for i in match.group(1).split(",") if i) if match else 1
    return 2.0 * math.prod(out_dims) * contract
  kernel = shapes.get(operands[1], [])
  labels = re.search(r"dim_labels=[^_]+_([^-]+)->", line)
  out_features = kernel[labels.group(1).index("o")] if labels and kernel else 1
  return 2.0 * math.prod(out_dims) * math.prod(kernel) / max(out_features, 1)


def breakdown(hlo_text: str) -> dict[str, dict[str, float]]:
  """{'flops': {source file: FLOPs}, 'collective_bytes': {kind: bytes}} of one HLO module."""
  shapes: dict[str, list[int]] = {}
  lines = hlo_text.splitlines()
  stacks = _Stacks(lines)
  for line in lines:
    match = _DEF.match(line)
    if match:
      shapes[match.group(1)] = _dims(match.group(2))
  flops: dict[str, float] = collections.Counter()
  comms: dict[str, float] = collections.Counter()
  for line in lines:
    match = _DEF.match(line)
    if not match:
      continue
    name, shape_text, op = match.groups()
    if op in ("dot", "convolution"):
      flops[f"{op} {stacks.source(line)}"] += _flops(op, _dims(shape_text), line, shapes)
    elif op.removesuffix("-start") in COLLECTIVES:
      comms[op.removesuffix("-start")] += _nbytes(shape_text)
  return {"flops": dict(flops), "collective_bytes": dict(comms)}


def format_breakdown(result: dict[str, dict[str, float]]) -> str:
  """Rows sorted by FLOPs, then collectives, as plain text."""
  total = sum(result["flops"].values()) or 1.0
  rows = [f"{'op / source':48s} {'TFLOP':>9s} {'share':>6s}"]
  for key, value in sorted(result["flops"].items(), key=lambda kv: -kv[1]):
    rows.append(f"{key:48s} {value / 1e12:9.3f} {value / total:6.1%}")
  rows.append(f"{'total dot + convolution':48s} {total / 1e12:9.3f}")
  for kind, value in sorted(result["collective_bytes"].items()):
    rows.append(f"{kind:48s} {value / 2**30:9.3f} GiB")
  return "\n".join(rows)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("error: usage: python -m psvae_jax.tools.hlo_breakdown FILE.hlo")
  with open(sys.argv[1]) as f:
    print(format_breakdown(breakdown(f.read())))
