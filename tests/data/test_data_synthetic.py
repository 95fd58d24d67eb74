"""The synthetic shapes world: determinism, captions, edit-pair ground truth, the scorer."""
import re

import numpy as np
import pytest
from scipy import ndimage

from psvae_jax.data import synthetic as syn
from psvae_jax.data import synthetic_score as score

_WORDS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}


def test_examples_are_a_pure_function_of_the_index():
  a, b = syn.shapes_example(123, 96), syn.shapes_example(123, 96)
  assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
  assert a["scene"] == b["scene"] and a["label"] == b["label"]
  others = [syn.shapes_example(i, 96) for i in range(124, 130)]
  assert all(not np.array_equal(a["image"], o["image"]) for o in others)
  e1, e2 = syn.edits_example(7, 64), syn.edits_example(7, 64)
  for key in ("source_image", "image", "edit_mask"):
    assert np.array_equal(e1[key], e2[key])
  assert e1["instruction"] == e2["instruction"]


@pytest.mark.parametrize("size", [32, 64, 256])
def test_render_any_size(size):
  scene = syn.sample_scene(np.random.default_rng(0))
  img = syn.render(scene, size)
  assert img.shape == (size, size, 3) and img.dtype == np.uint8
  assert tuple(img[0, 0]) == syn.BACKGROUND  # corners are never covered
  hard = syn.render(scene, size, antialias=False)
  assert set(map(tuple, hard.reshape(-1, 3))) <= {syn.BACKGROUND, *syn.COLOURS.values()}


def test_objects_stay_inside_their_cell():
  """Every object of the grid worlds keeps a gap to its cell border (objects never touch, so
  the detector and the edit masks see them apart), for the largest radius of each shape."""
  cell = 1.0 / syn.GRID
  for i in range(300):
    for o in syn.sample_scene(syn.example_rng(i, 0)).objects:
      x0, y0 = o.col * cell, o.row * cell
      gap = min(o.cx - o.extent - x0, x0 + cell - o.cx - o.extent,
                o.cy - o.extent - y0, y0 + cell - o.cy - o.extent)
      assert gap >= syn._CELL_MARGIN - 1e-9, (i, o)
  for shape in syn.SHAPES:
    big = syn.sample_object(np.random.default_rng(0), 1, 1, shape=shape,
                            radius=syn._RADIUS_RANGE[1] * cell)
    assert big.extent + syn._CELL_MARGIN <= cell / 2


def _caption_counts(text: str) -> dict:
  counts = {}
  for number, colour, shape in re.findall(r"\b(an?|two|three|four) (\w+) (circle|square|triangle)s?\b", text):
    counts[(colour, shape)] = counts.get((colour, shape), 0) + _WORDS[number]
  return counts


def test_captions_state_the_scene():
  for i in range(200):
    scene = syn.sample_scene(syn.example_rng(i, 0))
    assert _caption_counts(syn.caption(scene)) == scene.counts()
    with_pos = syn.caption(scene, positions=True)
    assert _caption_counts(with_pos) == scene.counts()
    for o in scene.objects:
      assert syn.position_phrase(o.row, o.col) in with_pos
  scene = syn.Scene((syn.ShapeObject("circle", "red", 0, 0, 0.15, 0.15, 0.08),
                     syn.ShapeObject("circle", "red", 2, 2, 0.85, 0.85, 0.08),
                     syn.ShapeObject("square", "orange", 1, 1, 0.5, 0.5, 0.08)))
  assert syn.caption(scene) == "two red circles and an orange square"
  assert syn.caption(scene, positions=True) == (
      "a red circle at the top left, a red circle at the bottom right and an orange square in the centre")
  assert scene.label == syn.class_index("red", "circle") == 0
  assert syn.Scene.from_json(scene.to_json()) == scene


def test_labels_cover_the_classes():
  labels = {syn.shapes_example(i, 32)["label"] for i in range(400)}
  assert labels == set(range(syn.NUM_CLASSES))


def _kind_examples(kind, n=12, size=96):
  found, i = [], 0
  while len(found) < n:
    rng = np.random.default_rng(i)
    scene = syn.sample_scene(rng)
    if kind in syn.feasible_edits(scene):
      found.append((scene, syn.sample_edit(rng, scene, kinds=(kind,))))
    i += 1
  return found


@pytest.mark.parametrize("kind", syn.EDIT_KINDS)
def test_edit_pairs_change_only_the_masked_region(kind):
  size = 96
  for scene, edit in _kind_examples(kind):
    assert edit.kind == kind
    src, tgt = syn.render(scene, size), syn.render(edit.target, size)
    mask = edit.mask_fn(size)
    assert mask.any()
    # Every kind: outside the mask the two images are identical, and the edit is visible.
    assert np.array_equal(src[~mask], tgt[~mask])
    assert not np.array_equal(src[mask], tgt[mask])
    bg = np.asarray(syn.BACKGROUND)
    if kind == "recolour":
      (old,) = [o for o in scene.objects if o not in edit.target.objects]
      (new,) = [o for o in edit.target.objects if o not in scene.objects]
      assert (old.shape, old.row, old.col, old.cx) == (new.shape, new.row, new.col, new.cx)
      assert old.colour in edit.instruction and new.colour in edit.instruction
      inside = ndimage.binary_erosion(syn.object_mask(new, size, antialias=False))
      assert inside.sum() > 20
      assert (tgt[inside] == syn.COLOURS[new.colour]).all()
      assert (src[inside] == syn.COLOURS[old.colour]).all()
    elif kind == "remove":
      assert len(edit.target.objects) == len(scene.objects) - 1
      assert (tgt[mask] == bg).all()  # the removed object's footprint becomes background
    elif kind == "add":
      assert len(edit.target.objects) == len(scene.objects) + 1
      new = edit.target.objects[-1]
      assert (src[mask] == bg).all()  # added on empty background
      assert new.colour in edit.instruction and new.shape in edit.instruction
      assert score.dominant_colour_in_region(tgt, _bbox(mask)) == new.colour
    else:  # move: same object, another cell; old place becomes background
      (old,) = [o for o in scene.objects if o not in edit.target.objects]
      (new,) = [o for o in edit.target.objects if o not in scene.objects]
      assert (old.shape, old.colour, old.radius) == (new.shape, new.colour, new.radius)
      assert (old.row, old.col) != (new.row, new.col)
      assert syn.cell_name(new.row, new.col) in edit.instruction
      old_only = syn.object_mask(old, size) & ~syn.object_mask(new, size)
      assert (tgt[old_only] == bg).all()


def _bbox(mask):
  ys, xs = np.nonzero(mask)
  return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_edit_world_example_fields():
  kinds = set()
  for i in range(40):
    ex = syn.edits_example(i, 64)
    kinds.add(ex["edit_kind"])
    assert ex["edit_mask"].shape == (64, 64) and ex["edit_mask"].dtype == bool
    assert np.array_equal(ex["source_image"][~ex["edit_mask"]], ex["image"][~ex["edit_mask"]])
    assert ex["caption"] == syn.caption(syn.Scene.from_json(ex["scene"]))
  assert kinds == set(syn.EDIT_KINDS)


def test_sample_edit_rejects_impossible_requests():
  one = syn.Scene((syn.ShapeObject("circle", "red", 1, 1, 0.5, 0.5, 0.08),))
  with pytest.raises(ValueError, match="none of the edit kinds"):
    syn.sample_edit(np.random.default_rng(0), one, kinds=("remove",))
  with pytest.raises(ValueError, match="unknown edit kinds"):
    syn.sample_edit(np.random.default_rng(0), one, kinds=("explode",))


def test_detector_recovers_scenes():
  results = [score.match_scene(syn.render(s, 128), s)
             for s in (syn.sample_scene(syn.example_rng(i, 0)) for i in range(60))]
  for key in ("count", "colours", "objects", "positions"):
    assert np.mean([r[key] for r in results]) >= 0.95, key
  # A wrong image fails the checks.
  a, b = (syn.sample_scene(syn.example_rng(i, 0)) for i in (1000, 1001))
  assert not score.match_scene(syn.render(a, 128), b)["objects"] or a.counts() == b.counts()
  blank = np.full((128, 128, 3), syn.BACKGROUND, np.uint8)
  assert score.detect_objects(blank) == []
  assert score.dominant_colour_in_region(blank, (0, 0, 128, 128)) is None
