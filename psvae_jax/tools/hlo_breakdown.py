"""Where a compiled step's FLOPs and collectives go, read from its optimised HLO text.

  python -m psvae_jax.tools.hlo_breakdown FILE.hlo      (the text of `compiled.as_text()`)

Every dot and convolution (fused or not) is counted as 2 x output elements x contraction size
and attributed to the innermost file of this project on its stack (the module's StackFrames
table: models/lpips.py, models/pixel_decoder.py, ...); so is an estimate of the HBM traffic
(see `breakdown`). Collectives are counted with their output bytes. Every computation counts as
often as it runs: a while loop's body times its trip count (XLA's own cost analysis counts it
once; the TPU compiler makes such loops of FSDP's weight gathers, "windowed einsums"). Per
chip, as the HLO is.

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

# An instruction: name = shape (an array, or a tuple of them with spaces) op(operands...
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|[a-z0-9]+\[[^\]]*\]\S*)\s+"
                  r"([a-z][\w\-]*)\(")
_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_OPERANDS = re.compile(r"\(([^)]*)\)")
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_FILE_NAME = re.compile(r'^(\d+) "(.*)"$')
_FILE_LOCATION = re.compile(r"^(\d+) \{file_name_id=(\d+)")
_STACK_FRAME = re.compile(r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
          "f64": 8, "s64": 8, "u64": 8}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Instructions that move no data through HBM themselves (bookkeeping, control flow).
_NO_TRAFFIC = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id", "iota")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"\b(calls|body|condition|branch_computations|true_computation|"
                    r"false_computation)=\{?([^}\s]*(?:, %[\w.\-]+)*)\}?")
_LOOP_LIMIT = re.compile(r"compare\([^)]*\)[^\n]*direction=LT")
_KNOWN_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_TUPLE_INDEX = re.compile(r"get-tuple-element\(.*\),\s*index=(\d+)")
_CONSTANT = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*[su]32\[\][^ ]*\s+constant\((\d+)\)")


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


class _Module:
  """An HLO module's computations, instructions and call graph."""

  def __init__(self, hlo_text: str):
    self.lines = hlo_text.splitlines()
    self.stacks = _Stacks(self.lines)
    self.shapes: dict[str, str] = {}  # instruction -> its shape text
    self.line_of: dict[str, str] = {}  # instruction -> its line
    self.computations: dict[str, list[str]] = {}  # name -> instruction lines
    self.entry = ""
    # computation -> [(called computation, how it is called)]
    self.calls: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    current = None
    for line in self.lines:
      if header := _COMPUTATION.match(line):
        current = header.group(2)
        self.computations[current] = []
        if header.group(1):
          self.entry = current
        continue
      match = _DEF.match(line)
      if not match or current is None:
        continue
      self.shapes[match.group(1)] = match.group(2)
      self.line_of[match.group(1)] = line
      self.computations[current].append(line)
      self.calls[current].extend(self._called(line))
    self.dims = {name: _dims(text) for name, text in self.shapes.items()}
    # Computations that fusion instructions call: their instructions stay on chip.
    self.fused = {c for lines in self.computations.values() for line in lines
                  if _DEF.match(line).group(3) == "fusion"
                  for c, kind in self._called(line) if kind == "calls"}
    self.multiplicity = self._multiplicities()

  @staticmethod
  def _called(line: str) -> list[tuple[str, str]]:
    return [(n.strip().lstrip("%"), kind) for kind, names in _CALLS.findall(line)
            for n in names.split(",") if n.strip()]

  def trip_count(self, while_line: str) -> float:
    """Iterations of a while loop: the trip count the compiler wrote down, else read from a
    loop `i = init; while i < N: ...; i += step` (the TPU compiler's form): its condition, its
    body's counter update and the counter's initial value (0 and 1 when they are not
    constants); 1 when the loop has another form."""
    known = _KNOWN_TRIP_COUNT.search(while_line)  # the CPU compiler writes it down
    if known:
      return float(known.group(1))
    called = dict((kind, c) for c, kind in self._called(while_line))
    limit = self._loop_limit(called.get("condition", ""))
    if limit is None:
      return 1.0
    index, bound = limit
    step = self._counter_step(called.get("body", ""), index) or 1
    operand = self.operand_names(while_line, "while")
    init = self._tuple_constant(operand[0], index) if operand else None
    return float(max(0, -(-(bound - (init or 0)) // step)))

  def _loop_limit(self, condition: str) -> tuple[int, int] | None:
    """(tuple index of the counter, N) of a condition `get-tuple-element(p, index=k) < N`."""
    for line in self.computations.get(condition, []):
      if _LOOP_LIMIT.search(line):
        a, b = self.operand_names(line, "compare")[:2]
        counter, bound = self._constant(b), _TUPLE_INDEX.search(self.line_of.get(a, ""))
        if counter is not None and bound:
          return int(bound.group(1)), counter
    return None

  def _counter_step(self, body: str, index: int) -> int | None:
    """c of the body's `counter + c` at tuple position `index` of its result."""
    root = next((line for line in self.computations.get(body, [])
                 if line.lstrip().startswith("ROOT") and " tuple(" in line), None)
    names = self.operand_names(root, "tuple") if root else []
    update = self.line_of.get(names[index], "") if index < len(names) else ""
    if _DEF.match(update) and _DEF.match(update).group(3) == "add":
      return next((c for c in map(self._constant, self.operand_names(update, "add"))
                   if c is not None), None)
    return None

  def _tuple_constant(self, tuple_name: str, index: int) -> int | None:
    line = self.line_of.get(tuple_name, "")
    if not _DEF.match(line) or _DEF.match(line).group(3) != "tuple":
      return None
    names = self.operand_names(line, "tuple")
    return self._constant(names[index]) if index < len(names) else None

  def _constant(self, name: str) -> int | None:
    match = _CONSTANT.match(self.line_of.get(name, ""))
    return int(match.group(2)) if match else None

  def _multiplicities(self) -> dict[str, float]:
    """How many times each computation runs per execution of the entry computation."""
    times: dict[str, float] = collections.Counter({self.entry: 1.0})
    order, seen, stack = [], set(), [self.entry]
    while stack:  # callers before callees (the call graph is acyclic)
      name = stack.pop()
      if name in seen:
        continue
      seen.add(name)
      order.append(name)
      stack.extend(c for c, _ in self.calls.get(name, []))
    indegree = collections.Counter(c for n in order for c, _ in self.calls.get(n, []))
    ready = [self.entry]
    while ready:
      name = ready.pop()
      for line in self.computations.get(name, []):
        called = self._called(line)
        for callee, kind in called:
          factor = self.trip_count(line) if kind == "body" else 1.0
          times[callee] += times[name] * factor
          indegree[callee] -= 1
          if indegree[callee] == 0:
            ready.append(callee)
    return dict(times)

  def operand_names(self, line: str, op: str) -> list[str]:
    operands = _OPERANDS.search(line[line.index(op + "("):]).group(1)
    return [o.strip().split(" ")[-1].lstrip("%") for o in operands.split(",") if o.strip()]


def breakdown(hlo_text: str, *, peak_flops: float = 0.0,
              hbm_bytes_per_s: float = 0.0) -> dict[str, dict[str, float]]:
  """{'flops': {op source: FLOPs}, 'bytes': {source: bytes}, 'collective_bytes': {kind: bytes},
  'loops': {...}} of one HLO module, counting each computation as often as it runs (a while
  loop's body times its trip count).

  'bytes' estimates HBM traffic: for every instruction outside fused computations (a fusion
  reads its operands and writes its result once; what happens inside stays on chip), its
  operands' and result's bytes, attributed like the FLOPs (an asynchronous -start/-done pair,
  such as the copies that prefetch into on-chip memory, once: its operands read and written). An instruction that reads only part
  of an operand (a slice) is counted with the whole operand, so this reads a little high.
  With `peak_flops` and `hbm_bytes_per_s`, 'roofline_s' adds each such instruction's time at
  the roofline, max(FLOPs / peak, bytes / bandwidth), per source (collectives and the insides
  of custom calls, such as Pallas kernels, are not timed).
  'loops': how many while loops run, and the dot/convolution FLOPs inside their bodies counted
  once (as XLA's cost analysis counts them) and as often as they run.
  """
  module = _Module(hlo_text)
  flops: dict[str, float] = collections.Counter()
  traffic: dict[str, float] = collections.Counter()
  seconds: dict[str, float] = collections.Counter()
  comms: dict[str, float] = collections.Counter()
  fusion_flops: dict[str, float] = {}  # fused computation -> its FLOPs, nested fusions included

  def instruction_flops(line: str) -> float:
    """A dot's or convolution's FLOPs, or a fusion's (those of the computations it calls)."""
    _, shape_text, op = _DEF.match(line).groups()
    if op in ("dot", "convolution"):
      return _flops(op, _dims(shape_text), line, module.dims)
    if op == "fusion":
      return sum(flops_of(c) for c, kind in module._called(line) if kind == "calls")
    return 0.0

  def flops_of(comp: str) -> float:
    if comp not in fusion_flops:
      fusion_flops[comp] = sum(instruction_flops(line)
                               for line in module.computations.get(comp, []))
    return fusion_flops[comp]

  once = in_loops = 0.0
  for comp, lines in module.computations.items():
    times = module.multiplicity.get(comp, 0.0)
    if not times:
      continue
    for line in lines:
      name, shape_text, op = _DEF.match(line).groups()
      source = module.stacks.source(line)
      if op in ("dot", "convolution"):
        value = _flops(op, _dims(shape_text), line, module.dims)
        flops[f"{op} {source}"] += value * times
        if times > 1:
          once += value
          in_loops += value * times
      elif op.removesuffix("-start") in COLLECTIVES:
        comms[op.removesuffix("-start")] += _nbytes(shape_text) * times
      if comp in module.fused or op in _NO_TRAFFIC or op.endswith("-done"):
        continue
      read = sum(_nbytes(module.shapes.get(n, "")) for n in module.operand_names(line, op))
      # An asynchronous op is a -start/-done pair whose shapes repeat its operands (the start's
      # result is a tuple of source, destination and sync flags): the start reads its operands
      # and writes as much; the done moves nothing more.
      moved = 2 * read if op.endswith("-start") else _nbytes(shape_text) + read
      traffic[source] += moved * times
      if peak_flops and hbm_bytes_per_s and op.removesuffix("-start") not in COLLECTIVES:
        seconds[source] += max(instruction_flops(line) / peak_flops,
                               moved / hbm_bytes_per_s) * times
  result = {"flops": dict(flops), "bytes": dict(traffic), "collective_bytes": dict(comms),
            "loops": {"count": sum(1 for ls in module.computations.values() for line in ls
                                   if " while(" in line),
                      "flops_in_bodies_once": once, "flops_in_bodies_run": in_loops}}
  if peak_flops and hbm_bytes_per_s:
    result["roofline_s"] = dict(seconds)
  return result


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
