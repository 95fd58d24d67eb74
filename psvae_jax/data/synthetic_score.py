"""Scores images against synthetic-world scenes (GenEval-like object, count, colour and position
checks), by classifying pixels to the palette and reading off connected components.

Meant for images of 64 px and more; at smaller sizes shape guesses become unreliable.
"""
import dataclasses

import numpy as np
from scipy import ndimage

from psvae_jax.data.synthetic import BACKGROUND, COLOUR_NAMES, COLOURS, GRID, Scene

_REFERENCES = np.asarray([COLOURS[c] for c in COLOUR_NAMES] + [BACKGROUND], np.float32)
BACKGROUND_CLASS = len(COLOUR_NAMES)
UNKNOWN_CLASS = -1


@dataclasses.dataclass(frozen=True)
class Detection:
  """A detected object: palette colour, shape guess, pixel box (x0, y0, x1, y1; x1/y1 exclusive),
  pixel area and the grid cell (row, col) holding its centre."""
  colour: str
  shape: str
  bbox: tuple[int, int, int, int]
  area: int
  row: int
  col: int


def colour_classes(image: np.ndarray, *, max_distance: float = 60.0) -> np.ndarray:
  """Per-pixel class: colour index, BACKGROUND_CLASS, or UNKNOWN_CLASS (far from every reference,
  e.g. antialiased edges)."""
  pix = np.asarray(image, np.float32).reshape(-1, 1, 3)
  dist = np.sqrt(((pix - _REFERENCES[None]) ** 2).sum(-1))
  cls = dist.argmin(-1)
  cls[dist.min(-1) > max_distance] = UNKNOWN_CLASS
  return cls.reshape(image.shape[:2])


def _shape_from_fill(fill: float) -> str:
  # Fraction of the bounding box covered: square ~1, circle ~pi/4, upright triangle ~1/2.
  if fill > 0.88:
    return "square"
  if fill > 0.64:
    return "circle"
  return "triangle"


def detect_objects(image: np.ndarray, *, min_area_fraction: float = 0.002,
                   max_distance: float = 60.0) -> list[Detection]:
  """Finds palette-coloured blobs in a uint8 (H, W, 3) image, largest first."""
  h, w = image.shape[:2]
  classes = colour_classes(image, max_distance=max_distance)
  min_area = max(1, int(min_area_fraction * h * w))
  found = []
  for k, name in enumerate(COLOUR_NAMES):
    components, n = ndimage.label(classes == k)
    if n == 0:
      continue
    areas = np.bincount(components.ravel(), minlength=n + 1)
    for idx, sl in enumerate(ndimage.find_objects(components), start=1):
      if sl is None or areas[idx] < min_area:
        continue
      y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
      fill = areas[idx] / ((y1 - y0) * (x1 - x0))
      row = min(GRID - 1, int((y0 + y1) / 2 / h * GRID))
      col = min(GRID - 1, int((x0 + x1) / 2 / w * GRID))
      found.append(Detection(name, _shape_from_fill(fill), (x0, y0, x1, y1), int(areas[idx]), row, col))
  return sorted(found, key=lambda d: -d.area)


def dominant_colour_in_region(image: np.ndarray, bbox, *, max_distance: float = 60.0) -> str | None:
  """The palette colour covering most pixels of bbox (x0, y0, x1, y1); None if only background."""
  x0, y0, x1, y1 = bbox
  classes = colour_classes(np.asarray(image)[y0:y1, x0:x1], max_distance=max_distance)
  counts = np.bincount(classes[(classes >= 0) & (classes < BACKGROUND_CLASS)].ravel(),
                       minlength=len(COLOUR_NAMES))
  return COLOUR_NAMES[int(counts.argmax())] if counts.sum() else None


def match_scene(image: np.ndarray, scene: Scene, **detect_kwargs) -> dict:
  """GenEval-like checks of an image against a scene.

  Returns {'count': total number of objects right, 'colours': multiset of colours right,
  'objects': multiset of (colour, shape) right, 'positions': every object of the scene found (same
  colour) in its grid cell, 'detections': the Detection list}.
  """
  dets = detect_objects(image, **detect_kwargs)
  want_objects = sorted((o.colour, o.shape) for o in scene.objects)
  got_objects = sorted((d.colour, d.shape) for d in dets)
  cells = {(d.row, d.col, d.colour) for d in dets}
  return {
      "count": len(dets) == len(scene.objects),
      "colours": sorted(c for c, _ in got_objects) == sorted(c for c, _ in want_objects),
      "objects": got_objects == want_objects,
      "positions": all((o.row, o.col, o.colour) in cells for o in scene.objects),
      "detections": dets,
  }
