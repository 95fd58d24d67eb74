"""A built-in world of coloured shapes with captions and edit pairs, for training without downloads
and for scoring generated images against known ground truth.

A scene holds 1-4 objects (circle, square or triangle in one of six named colours), each in its own
cell of a 3x3 grid, with a random size and a jittered centre. The single-object world (its own
stream) draws one large object anywhere in the image. Geometry is stored in normalised
image coordinates, so a scene renders at any resolution. Every example is a pure function of its
index (and the world seed): the world is random-access and deterministic.

Edit pairs (`sample_edit`): recolour, add, remove or move one object. Objects never leave their
cell, so the pixels outside the edited object's footprint (the mask) are identical in the source
and the target image, for every kind.
"""
import dataclasses
import functools
import json
from typing import Callable, NamedTuple

import numpy as np

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
BACKGROUND_LEVEL = 235  # a neutral grey, so the background is one scalar fill
BACKGROUND = (BACKGROUND_LEVEL,) * 3
GRID = 3
MAX_OBJECTS = 4
NUM_CLASSES = len(COLOUR_NAMES) * len(SHAPES)
EDIT_KINDS = ("recolour", "add", "remove", "move")
WORLD_SEED = 20251217

# Object size: radius in units of a grid cell; squares and triangles are scaled so the three
# shapes look about equally big. Extent = how far the shape reaches from its centre. The range
# fills the cell nearly as far as the largest triangle allows (12-16 px wide circles at 64 px):
# an 8 px generator token then sees most of an object, not a sliver of it.
_RADIUS_RANGE = (0.28, 0.38)
_SHAPE_SCALE = {"circle": 1.0, "square": 0.85, "triangle": 1.2}
# The single-object world's radius, in units of the image (16-28 px wide objects at 64 px).
_SINGLE_RADIUS_RANGE = (0.13, 0.22)
_CELL_MARGIN = 0.01  # normalised gap kept between a shape and its cell border
_NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
_ROW_WORDS = ("top", "", "bottom")
_COL_WORDS = ("left", "", "right")
_SQRT3_2 = float(np.sqrt(3.0) / 2.0)
_COLOUR_ARRAYS = {name: np.asarray(rgb, np.float32) for name, rgb in COLOURS.items()}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One object. cx, cy, radius are in normalised image units ([0, 1] across the image)."""
  shape: str
  colour: str
  row: int
  col: int
  cx: float
  cy: float
  radius: float

  @property
  def extent(self) -> float:
    return self.radius * _SHAPE_SCALE[self.shape]

  @property
  def class_index(self) -> int:
    return class_index(self.colour, self.shape)


@dataclasses.dataclass(frozen=True)
class Scene:
  """An ordered tuple of objects on distinct grid cells."""
  objects: tuple[ShapeObject, ...]

  @property
  def label(self) -> int:
    """Class (colour x shape) of the first object, in [0, NUM_CLASSES)."""
    return self.objects[0].class_index

  def counts(self) -> dict[tuple[str, str], int]:
    """Number of objects per (colour, shape), in order of first appearance."""
    out = {}
    for o in self.objects:
      out[(o.colour, o.shape)] = out.get((o.colour, o.shape), 0) + 1
    return out

  def free_cells(self) -> list[tuple[int, int]]:
    used = {(o.row, o.col) for o in self.objects}
    return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]

  def to_json(self) -> str:
    fields = [f.name for f in dataclasses.fields(ShapeObject)]
    return json.dumps([{k: getattr(o, k) for k in fields} for o in self.objects],
                      separators=(",", ":"))

  @classmethod
  def from_json(cls, text: str) -> "Scene":
    return cls(tuple(ShapeObject(**d) for d in json.loads(text)))


def class_index(colour: str, shape: str) -> int:
  """The label of a (colour, shape) pair: colour-major, in [0, NUM_CLASSES)."""
  return COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


def sample_object(rng: np.random.Generator, row: int, col: int, *, shape: str | None = None,
                  colour: str | None = None, radius: float | None = None) -> ShapeObject:
  """Samples an object inside grid cell (row, col); unset attributes are drawn at random."""
  return _object_from_uniforms(rng.random(5), row, col, shape, colour, radius)


def _object_from_uniforms(u, row, col, shape=None, colour=None, radius=None) -> ShapeObject:
  """Builds an object from 5 uniforms in [0, 1) (shape, colour, radius, x and y jitter)."""
  shape = shape or SHAPES[int(u[0] * len(SHAPES))]
  colour = colour or COLOUR_NAMES[int(u[1] * len(COLOUR_NAMES))]
  cell = 1.0 / GRID
  if radius is None:
    lo, hi = _RADIUS_RANGE
    radius = (lo + (hi - lo) * float(u[2])) * cell
  room = cell / 2 - radius * _SHAPE_SCALE[shape] - _CELL_MARGIN
  cx = (col + 0.5) * cell + (2 * float(u[3]) - 1) * room
  cy = (row + 0.5) * cell + (2 * float(u[4]) - 1) * room
  return ShapeObject(shape, colour, row, col, cx, cy, radius)


def sample_scene(rng: np.random.Generator, *, min_objects: int = 1,
                 max_objects: int = MAX_OBJECTS) -> Scene:
  """Samples a scene of min_objects..max_objects objects on distinct grid cells."""
  if not 1 <= min_objects <= max_objects <= GRID * GRID:
    raise ValueError(f"need 1 <= min_objects <= max_objects <= {GRID * GRID}, "
                     f"got {min_objects}, {max_objects}")
  n = int(rng.integers(min_objects, max_objects + 1))
  cells = rng.permutation(GRID * GRID)[:n]
  u = rng.random((n, 5)).tolist()
  return Scene(tuple(_object_from_uniforms(u[k], int(c) // GRID, int(c) % GRID)
                     for k, c in enumerate(cells)))


def _coverage(obj: ShapeObject, size: int, antialias: bool):
  """Returns (coverage in [0, 1] over the object's pixel box, (y0, y1, x0, x1))."""
  cx, cy, ext = obj.cx * size, obj.cy * size, obj.extent * size
  x0, x1 = max(0, int(np.floor(cx - ext - 1))), min(size, int(np.ceil(cx + ext + 1)))
  y0, y1 = max(0, int(np.floor(cy - ext - 1))), min(size, int(np.ceil(cy + ext + 1)))
  xs = (np.arange(x0, x1, dtype=np.float32) + 0.5) - cx
  ys = (np.arange(y0, y1, dtype=np.float32) + 0.5) - cy
  if obj.shape == "circle":
    dist = np.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2) - ext
  elif obj.shape == "square":
    dist = np.maximum(np.abs(ys)[:, None], np.abs(xs)[None, :]) - ext
  else:  # upright equilateral triangle, centroid at (cx, cy), circumradius ext
    ys_, xs_ = ys[:, None], xs[None, :]
    dist = np.maximum(np.maximum(ys_ - ext / 2, -_SQRT3_2 * xs_ - ys_ / 2 - ext / 2),
                      _SQRT3_2 * xs_ - ys_ / 2 - ext / 2)
  if antialias:
    cov = np.clip(0.5 - dist, 0.0, 1.0)
  else:
    cov = (dist <= 0).astype(np.float32)
  return cov, (y0, y1, x0, x1)


def render(scene: Scene, size: int, *, antialias: bool = True) -> np.ndarray:
  """Renders a scene as uint8 (size, size, 3); antialiased edges by analytic pixel coverage."""
  img = np.full((size, size, 3), BACKGROUND_LEVEL, np.uint8)
  for obj in scene.objects:
    cov, (y0, y1, x0, x1) = _coverage(obj, size, antialias)
    region = img[y0:y1, x0:x1].astype(np.float32)
    region += (_COLOUR_ARRAYS[obj.colour] - region) * cov[..., None]
    region += 0.5  # round to nearest on the uint8 cast (values are in [0, 255])
    img[y0:y1, x0:x1] = region
  return img


def object_mask(obj: ShapeObject, size: int, *, antialias: bool = True) -> np.ndarray:
  """Boolean (size, size) footprint: every pixel the object touches when rendered."""
  mask = np.zeros((size, size), bool)
  cov, (y0, y1, x0, x1) = _coverage(obj, size, antialias)
  mask[y0:y1, x0:x1] = cov > 0
  return mask


def objects_mask(objects, size: int, *, antialias: bool = True) -> np.ndarray:
  """Union of the footprints of `objects`."""
  mask = np.zeros((size, size), bool)
  for obj in objects:
    mask |= object_mask(obj, size, antialias=antialias)
  return mask


def position_phrase(row: int, col: int) -> str:
  """'at the top left', 'on the left', 'in the centre', 'at the bottom'..."""
  place = cell_name(row, col)
  if place == "centre":
    return "in the centre"
  return f"on the {place}" if row == 1 else f"at the {place}"


def cell_name(row: int, col: int) -> str:
  """'top left', 'top', 'left', 'centre', 'bottom right'..."""
  words = " ".join(w for w in (_ROW_WORDS[row], _COL_WORDS[col]) if w)
  return words or "centre"


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(count: int, colour: str, shape: str) -> str:
  if count == 1:
    return f"{_article(colour)} {colour} {shape}"
  return f"{_NUMBER_WORDS.get(count, str(count))} {colour} {shape}s"


def _join(parts: list[str]) -> str:
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, *, positions: bool = False) -> str:
  """'two red circles and a blue square'; with positions each object is named with its place:
  'a red circle at the top left and a blue square in the centre'."""
  if positions:
    return _join([f"{_noun_phrase(1, o.colour, o.shape)} {position_phrase(o.row, o.col)}"
                  for o in scene.objects])
  return _join([_noun_phrase(n, c, s) for (c, s), n in scene.counts().items()])


def _reference(obj: ShapeObject, scene: Scene) -> str:
  """'red circle', plus the position when the scene holds several red circles."""
  if scene.counts()[(obj.colour, obj.shape)] > 1:
    return f"{obj.colour} {obj.shape} {position_phrase(obj.row, obj.col)}"
  return f"{obj.colour} {obj.shape}"


class EditSample(NamedTuple):
  """An edit: the target scene, its instruction, its kind and mask_fn(size) -> bool (size, size)
  marking the edited region (the only pixels that differ between source and target renders)."""
  target: Scene
  instruction: str
  kind: str
  mask_fn: Callable[[int], np.ndarray]


def feasible_edits(scene: Scene) -> tuple[str, ...]:
  """The edit kinds that apply to `scene` (add/move need a free cell, remove a second object)."""
  kinds = ["recolour"]
  if scene.free_cells() and len(scene.objects) < MAX_OBJECTS:
    kinds.append("add")
  if len(scene.objects) >= 2:
    kinds.append("remove")
  if scene.free_cells():
    kinds.append("move")
  return tuple(k for k in EDIT_KINDS if k in kinds)


def sample_edit(rng: np.random.Generator, scene: Scene, kinds=EDIT_KINDS) -> EditSample:
  """Samples one edit of `scene` among `kinds` (restricted to the feasible ones)."""
  unknown = set(kinds) - set(EDIT_KINDS)
  if unknown:
    raise ValueError(f"unknown edit kinds {sorted(unknown)}; known: {EDIT_KINDS}")
  options = [k for k in feasible_edits(scene) if k in kinds]
  if not options:
    raise ValueError(f"none of the edit kinds {tuple(kinds)} applies to a scene of "
                     f"{len(scene.objects)} objects")
  kind = options[rng.integers(len(options))]
  objs = list(scene.objects)
  if kind == "add":
    row, col = scene.free_cells()[rng.integers(len(scene.free_cells()))]
    new = sample_object(rng, row, col)
    instruction = f"add {_noun_phrase(1, new.colour, new.shape)} {position_phrase(row, col)}"
    target = Scene((*objs, new))
    return EditSample(target, instruction, kind, functools.partial(_mask_of, (new,)))
  i = int(rng.integers(len(objs)))
  obj, ref = objs[i], _reference(objs[i], scene)
  if kind == "recolour":
    colour = [c for c in COLOUR_NAMES if c != obj.colour][rng.integers(len(COLOUR_NAMES) - 1)]
    objs[i] = dataclasses.replace(obj, colour=colour)
    template = ("make the {ref} {c}", "change the colour of the {ref} to {c}",
                "turn the {ref} {c}")[rng.integers(3)]
    instruction = template.format(ref=ref, c=colour)
    changed = (obj,)
  elif kind == "remove":
    del objs[i]
    instruction = ("remove the {ref}", "delete the {ref}")[rng.integers(2)].format(ref=ref)
    changed = (obj,)
  else:  # move
    row, col = scene.free_cells()[rng.integers(len(scene.free_cells()))]
    moved = sample_object(rng, row, col, shape=obj.shape, colour=obj.colour, radius=obj.radius)
    objs[i] = moved
    instruction = f"move the {ref} to the {cell_name(row, col)}"
    changed = (obj, moved)
  return EditSample(Scene(tuple(objs)), instruction, kind, functools.partial(_mask_of, changed))


def _mask_of(objects, size: int, *, antialias: bool = True) -> np.ndarray:
  return objects_mask(objects, size, antialias=antialias)


def example_rng(index: int, stream: int, seed: int = WORLD_SEED) -> np.random.Generator:
  """The generator behind example `index` of a stream (0 = shapes, 1 = edits, 2 = single)."""
  return np.random.default_rng((seed, stream, index))


def shapes_example(index: int, size: int, *, seed: int = WORLD_SEED) -> dict:
  """Example `index` of the shapes world: image, caption (half with positions), label, scene."""
  return _captioned_example(example_rng(index, 0, seed), size, MAX_OBJECTS)


def single_example(index: int, size: int, *, seed: int = WORLD_SEED) -> dict:
  """Example `index` of the single-object world (its own stream): the fields of
  `shapes_example`; every scene holds one large object (`sample_single_scene`)."""
  rng = example_rng(index, 2, seed)
  scene = sample_single_scene(rng)
  return _example_fields(scene, size, with_positions=bool(rng.integers(2)))


def sample_single_scene(rng: np.random.Generator) -> Scene:
  """One object, drawn large (GenEval's single-object prompts show the object big): radius
  `_SINGLE_RADIUS_RANGE` of the image, centre anywhere it fits; row/col name the grid cell of
  its centre (for position captions)."""
  u = rng.random(5)
  shape = SHAPES[int(u[0] * len(SHAPES))]
  colour = COLOUR_NAMES[int(u[1] * len(COLOUR_NAMES))]
  lo, hi = _SINGLE_RADIUS_RANGE
  radius = lo + (hi - lo) * float(u[2])
  reach = radius * _SHAPE_SCALE[shape] + _CELL_MARGIN
  cx, cy = (reach + (1 - 2 * reach) * float(v) for v in u[3:5])
  row, col = (min(GRID - 1, int(v * GRID)) for v in (cy, cx))
  return Scene((ShapeObject(shape, colour, row, col, cx, cy, radius),))


def _captioned_example(rng: np.random.Generator, size: int, max_objects: int) -> dict:
  scene = sample_scene(rng, max_objects=max_objects)
  return _example_fields(scene, size, with_positions=bool(rng.integers(2)))


def _example_fields(scene: Scene, size: int, *, with_positions: bool) -> dict:
  return {"image": render(scene, size), "caption": caption(scene, positions=with_positions),
          "label": scene.label, "scene": scene.to_json()}


def edits_example(index: int, size: int, *, seed: int = WORLD_SEED) -> dict:
  """Example `index` of the edit world: source_image, image (the target), instruction, edit_mask,
  edit_kind, the target's caption, label and scene."""
  rng = example_rng(index, 1, seed)
  scene = sample_scene(rng)
  edit = sample_edit(rng, scene)
  return {"source_image": render(scene, size), "image": render(edit.target, size),
          "instruction": edit.instruction, "edit_mask": edit.mask_fn(size),
          "edit_kind": edit.kind, "caption": caption(edit.target), "label": edit.target.label,
          "scene": edit.target.to_json()}
