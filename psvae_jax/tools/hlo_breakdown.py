"""Where a compiled step's FLOPs and collectives go, read from its optimised HLO text.

  python -m psvae_jax.tools.hlo_breakdown FILE.hlo      (the text of `compiled.as_text()`)

Every dot and convolution (fused or not) is counted as 2 x output elements x contraction size
and attributed to the innermost file of this project on its stack; so is an estimate of the
HBM traffic (see `breakdown`) (the module's StackFrames table):
models/lpips.py, models/pixel_decoder.py, ... Collectives are counted with their output bytes. Loop bodies are
counted once (the autoencoder steps have no scanned layers); per chip, as the HLO is.

A convolution's contraction counts only the window taps that land on real input elements:
padding and the holes of an input dilation are skipped. The TPU compiler writes batched matmuls
(attention's) as convolutions whose window spans the batch dimensions with an input dilation as
large as the window, so that each output element meets one real tap; counting the whole window
would multiply those matmuls' FLOPs by the batch size.
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
  lhs, kernel = shapes.get(operands[0], []), shapes.get(operands[1], [])
  labels = re.search(r"dim_labels=([^_]+)_([^-]+)->", line)
  if not (labels and kernel and lhs):
    return 2.0 * math.prod(out_dims) * math.prod(kernel)  # unlabelled: an upper bound
  lhs_labels, kernel_labels = labels.groups()
  in_features = kernel[kernel_labels.index("i")]
  window = _window(line)
  taps = 1.0
  for d, label in enumerate(kernel_labels):
    if label.isdigit():
      taps *= _mean_valid_taps(lhs[lhs_labels.index(label)], kernel[d],
                               out_dims[_output_position(line, label)],
                               {k: v[int(label)] for k, v in window.items()})
  return 2.0 * math.prod(out_dims) * in_features * taps


def _window(line: str) -> dict[str, list]:
  """The convolution's window attributes per spatial dimension: stride, pad (low, high),
  lhs_dilate, rhs_dilate (absent ones are the identity for every dimension)."""
  match = re.search(r"window=\{([^}]*)\}", line)
  fields = dict(item.split("=", 1) for item in match.group(1).split()) if match else {}
  count = len(fields.get("size", "").split("x")) if fields.get("size") else 0
  ints = lambda key, default: ([int(v) for v in fields[key].split("x")] if key in fields
                               else [default] * count)
  pads = ([tuple(int(p) for p in v.split("_")) for v in fields["pad"].split("x")]
          if "pad" in fields else [(0, 0)] * count)
  return {"stride": ints("stride", 1), "pad": pads, "lhs_dilate": ints("lhs_dilate", 1),
          "rhs_dilate": ints("rhs_dilate", 1)}


def _output_position(line: str, label: str) -> int:
  """Index of spatial dimension `label` in the convolution's output shape."""
  out_labels = re.search(r"->(\w+)", line).group(1)
  return out_labels.index(label)


def _mean_valid_taps(in_size: int, window: int, out_size: int, w: dict) -> float:
  """Kernel taps per output position, averaged over the output, that read a real input
  element (not padding, not a hole of the input dilation)."""
  if not w:
    return float(window)
  dilated = (in_size - 1) * w["lhs_dilate"] + 1
  low = w["pad"][0]
  valid = 0
  for o in range(out_size):
    for k in range(window):
      at = o * w["stride"] + k * w["rhs_dilate"] - low
      valid += 0 <= at < dilated and at % w["lhs_dilate"] == 0
  return valid / max(out_size, 1)


# Instructions that move no data through HBM themselves (bookkeeping, control flow).
_NO_TRAFFIC = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id", "iota")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def breakdown(hlo_text: str) -> dict[str, dict[str, float]]:
  """{'flops': {source: FLOPs}, 'bytes': {source: bytes}, 'collective_bytes': {kind: bytes}}
  of one HLO module.

  'bytes' estimates HBM traffic: for every instruction outside fused computations (a fusion
  reads its operands and writes its result once; what happens inside stays on chip), its
  operands' and result's bytes, attributed like the FLOPs. An instruction that reads only part
  of an operand (a slice) is counted with the whole operand, so this reads a little high.
  """
  shapes: dict[str, str] = {}  # instruction -> its shape text
  lines = hlo_text.splitlines()
  stacks = _Stacks(lines)
  fused: set[str] = set()
  for line in lines:
    match = _DEF.match(line)
    if match:
      shapes[match.group(1)] = match.group(2)
      if match.group(3) == "fusion" and (called := _CALLS.search(line)):
        fused.add(called.group(1))
  dims = {name: _dims(text) for name, text in shapes.items()}
  flops: dict[str, float] = collections.Counter()
  traffic: dict[str, float] = collections.Counter()
  comms: dict[str, float] = collections.Counter()
  inside_fusion = False
  for line in lines:
    if header := _COMPUTATION.match(line):
      inside_fusion = header.group(2) in fused
      continue
    match = _DEF.match(line)
    if not match:
      continue
    name, shape_text, op = match.groups()
    source = stacks.source(line)
    if op in ("dot", "convolution"):
      flops[f"{op} {source}"] += _flops(op, _dims(shape_text), line, dims)
    elif op.removesuffix("-start") in COLLECTIVES:
      comms[op.removesuffix("-start")] += _nbytes(shape_text)
    if not inside_fusion and op not in _NO_TRAFFIC:
      operands = _OPERANDS.search(line[line.index(op + "("):]).group(1)
      names = [o.strip().split(" ")[-1].lstrip("%") for o in operands.split(",") if o.strip()]
      traffic[source] += _nbytes(shape_text) + sum(_nbytes(shapes.get(n, "")) for n in names)
  return {"flops": dict(flops), "bytes": dict(traffic), "collective_bytes": dict(comms)}


def format_breakdown(result: dict[str, dict[str, float]]) -> str:
  """Rows sorted by FLOPs, then by HBM traffic, then collectives, as plain text."""
  total = sum(result["flops"].values()) or 1.0
  rows = [f"{'op / source':48s} {'TFLOP':>9s} {'share':>6s}"]
  for key, value in sorted(result["flops"].items(), key=lambda kv: -kv[1]):
    rows.append(f"{key:48s} {value / 1e12:9.3f} {value / total:6.1%}")
  rows.append(f"{'total dot + convolution':48s} {total / 1e12:9.3f}")
  traffic = result.get("bytes", {})
  total_bytes = sum(traffic.values()) or 1.0
  rows.append(f"{'HBM traffic (estimate) / source':48s} {'GiB':>9s} {'share':>6s}")
  for key, value in sorted(traffic.items(), key=lambda kv: -kv[1]):
    rows.append(f"{key:48s} {value / 2**30:9.3f} {value / total_bytes:6.1%}")
  for kind, value in sorted(result["collective_bytes"].items()):
    rows.append(f"{kind:48s} {value / 2**30:9.3f} GiB")
  return "\n".join(rows)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("error: usage: python -m psvae_jax.tools.hlo_breakdown FILE.hlo")
  with open(sys.argv[1]) as f:
    print(format_breakdown(breakdown(f.read())))
