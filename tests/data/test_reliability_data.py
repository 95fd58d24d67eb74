"""Corrupt and unusual data through the real sources (image folder and ArrayRecord shards).

Every case is either converted (odd image modes) or skipped and counted with its reason
(undecodable or absurd images, missing or non-UTF-8 captions when captions are required); none
stops the run. Past data.max_bad_fraction the pipeline raises naming examples.
"""
import io
import json

import numpy as np
import pytest
from PIL import Image

from helpers.images import png_with_header_size
from psvae_jax.data import DataError, make_train_iterator
from psvae_jax.data.decode import encode_image
from psvae_jax.data.errors import MIN_RECORDS_FOR_BAD_CHECK
from psvae_jax.data.shards import ShardWriter

pytestmark = pytest.mark.reliability

SIZE = 40  # of the good images and the converted cases (above min_image_size=32)
N_GOOD = 7


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _palette_with_transparency() -> bytes:
  im = Image.new("P", (SIZE, SIZE), 1)
  im.putpalette([0, 0, 255, 9, 9, 9] + [0] * 762)
  return _save(im, "PNG", transparency=1)  # every pixel uses the transparent index


def _noise_jpeg() -> bytes:
  rng = np.random.default_rng(0)
  return encode_image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), format="jpeg")


# name -> (image bytes, expected): ('converted', RGB the whole image should have, tolerance),
# or ('skipped', fragment of the reason).
IMAGE_CASES = {
    "grayscale": (lambda: _save(Image.new("L", (SIZE, SIZE), 100), "PNG"),
                  ("converted", (100, 100, 100), 0)),
    "cmyk_jpeg": (lambda: _save(Image.new("RGB", (SIZE, SIZE), (220, 0, 0)).convert("CMYK"),
                                "JPEG", quality=95), ("converted", (220, 0, 0), 15)),
    "sixteen_bit": (lambda: _save(Image.fromarray(np.full((SIZE, SIZE), 257 * 128, np.uint16)),
                                  "PNG"), ("converted", (128, 128, 128), 0)),
    "alpha_transparent": (lambda: _save(Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0)), "PNG"),
                          ("converted", (255, 255, 255), 0)),
    "palette_transparent": (_palette_with_transparency, ("converted", (255, 255, 255), 0)),
    "truncated_jpeg": (lambda: _noise_jpeg()[:len(_noise_jpeg()) // 2], ("skipped", "truncated")),
    "zero_bytes": (lambda: b"", ("skipped", "empty file")),
    "not_an_image": (lambda: b"%PDF-1.4 a document\n", ("skipped", "not a recognised image")),
    "one_by_one": (lambda: _save(Image.new("RGB", (1, 1)), "PNG"), ("skipped", "too small")),
    "header_20000x20000": (lambda: png_with_header_size(20000, 20000),
                           ("skipped", "too many pixels")),
    "corrupt_png_body": (lambda: _save(Image.new("RGB", (SIZE, SIZE), 5), "PNG")[:60] + b"\0" * 40,
                         ("skipped", "corrupt")),
}
CAPTION_CASES = ("missing_caption", "non_utf8_caption")


def _good(i):
  return encode_image(np.full((SIZE, SIZE, 3), 20 * i, np.uint8))


def _write_folder(root, case):
  """N_GOOD good PNGs captioned 'good i' and the case; returns the data.source spec."""
  root.mkdir()
  lines = []
  for i in range(N_GOOD):
    (root / f"good_{i}.png").write_bytes(_good(i))
    lines.append(json.dumps({"file": f"good_{i}.png", "caption": f"good {i}"}).encode())
  if case in IMAGE_CASES:
    (root / "zz_case.png").write_bytes(IMAGE_CASES[case][0]())
    lines.append(json.dumps({"file": "zz_case.png", "caption": case}).encode())
  else:
    (root / "zz_case.png").write_bytes(_good(N_GOOD))
    if case == "non_utf8_caption":
      lines.append('{"file": "zz_case.png", "caption": "caf\xe9"}'.encode("latin-1"))
  (root / "captions.jsonl").write_bytes(b"\n".join(lines))
  return f"folder:{root}"


def _write_arrayrecord(root, case):
  with ShardWriter(str(root), "train", records_per_shard=5) as writer:
    for i in range(N_GOOD):
      writer.write({"image": _good(i), "caption": f"good {i}"})
    if case in IMAGE_CASES:
      writer.write({"image": IMAGE_CASES[case][0](), "caption": case})
    else:
      caption = None if case == "missing_caption" else "caf\xe9".encode("latin-1")
      writer.write({"image": _good(N_GOOD), "caption": caption})
  return f"arrayrecord:{root}/train-*.array_record"


WRITERS = {"folder": _write_folder, "arrayrecord": _write_arrayrecord}


def _read_one_epoch(spec, **cfg):
  it = make_train_iterator({"source": spec, "image_size": 32, "eval_size": 0, "shuffle": False,
                            "prefetch": 0, "read_threads": 2, "max_bad_fraction": 1.0, **cfg},
                           global_batch_size=4, seed=0, process_index=0, process_count=1)
  batches = [next(it), next(it)]  # 8 examples: the whole source, or 7 good + 1 repeated
  stats = it.stats()
  it.close()
  examples = [{k: b[k][i] for k in b} for b in batches for i in range(len(b["image"]))]
  return examples, stats


def _image_case_params():
  for case, (_, outcome) in IMAGE_CASES.items():
    expected = ("converted to RGB" if outcome[0] == "converted"
                else f"skipped and counted: '{outcome[1]}'")
    yield pytest.param(case, id=case, marks=pytest.mark.reliability(
        fault=f"{case} image via the {{source}} source", expected=expected))


@pytest.mark.parametrize("source", list(WRITERS))
@pytest.mark.parametrize("case", _image_case_params())
def test_image_case_is_converted_or_skipped_and_counted(tmp_path, source, case):
  spec = WRITERS[source](tmp_path / "data", case)
  examples, stats = _read_one_epoch(spec)
  assert all(e["image"].shape == (32, 32, 3) and e["image"].dtype == np.uint8 for e in examples)
  outcome = IMAGE_CASES[case][1]
  found = [e for e in examples if e["caption"] == case]
  if outcome[0] == "converted":
    assert stats["bad"] == 0 and len(found) == 1, stats
    _, rgb, tolerance = outcome
    assert np.abs(found[0]["image"].astype(int) - rgb).max() <= tolerance
  else:
    assert not found and stats["bad"] == 1 and stats["seen"] == N_GOOD + 2, stats
    assert outcome[1] in stats["examples_of_bad"][0], stats["examples_of_bad"]


@pytest.mark.reliability(
    fault="{case} via the {source} source",
    expected="empty caption, counted; skipped and counted when data.skip_uncaptioned")
@pytest.mark.parametrize("source", list(WRITERS))
@pytest.mark.parametrize("case", CAPTION_CASES)
def test_caption_case_falls_back_or_is_skipped_when_required(tmp_path, source, case):
  spec = WRITERS[source](tmp_path / "data", case)
  examples, stats = _read_one_epoch(spec)
  assert stats["bad"] == 0 and stats["caption_fallback"] == 1, stats
  assert [e["caption"] for e in examples].count("") == 1

  examples, stats = _read_one_epoch(spec, skip_uncaptioned=True)
  assert "" not in [e["caption"] for e in examples]
  assert stats["bad"] == 1 and "missing or non-UTF-8 caption" in stats["examples_of_bad"][0]


@pytest.mark.reliability(
    fault="bad records above data.max_bad_fraction (ArrayRecord)",
    expected="DataError naming examples")
def test_too_many_bad_arrayrecord_records_raise_naming_examples(tmp_path):
  with ShardWriter(str(tmp_path), "train", records_per_shard=100) as writer:
    for i in range(10):
      writer.write({"image": b"" if i % 3 == 0 else _good(i), "caption": f"{i}"})
  it = make_train_iterator({"source": f"arrayrecord:{tmp_path}/train-*.array_record",
                            "image_size": 32, "eval_size": 0, "prefetch": 0, "read_threads": 2,
                            "max_bad_fraction": 0.1},
                           global_batch_size=5, seed=0, process_index=0, process_count=1)
  with pytest.raises(DataError, match=r"above data.max_bad_fraction=0.1. Examples: "
                                      r"arrayrecord:.*#\d+: empty file"):
    for _ in range(MIN_RECORDS_FOR_BAD_CHECK):
      next(it)
  it.close()


@pytest.mark.reliability(fault="ArrayRecord record without a 'caption' field (others have one)",
                         expected="empty caption, counted (like a None caption)")
def test_arrayrecord_record_without_caption_field(tmp_path):
  with ShardWriter(str(tmp_path), "train", records_per_shard=100) as writer:
    for i in range(N_GOOD + 1):
      writer.write({"image": _good(i)} if i == 3 else {"image": _good(i), "caption": f"good {i}"})
  examples, stats = _read_one_epoch(f"arrayrecord:{tmp_path}/train-*.array_record")
  assert stats["caption_fallback"] == 1 and [e["caption"] for e in examples].count("") == 1
