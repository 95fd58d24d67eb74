"""The prepare tool: webdataset tars, image folders, edit JSONL and OmniEdit parquet files become
shards that the real training pipeline reads back; bad inputs are skipped and counted."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from psvae_jax.data import DataError, make_train_iterator, sources
from psvae_jax.tools import prepare as prep

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SIZE = 48


def _pixels(i: int, w: int = SIZE, h: int = SIZE) -> np.ndarray:
  """A distinct smooth image per i (smooth so JPEG stays close to it)."""
  yy, xx = np.mgrid[0:h, 0:w]
  rgb = [xx * 96 // w + i * 12, yy * 96 // h + (i * 37) % 150, np.full_like(xx, (i * 90) % 256)]
  return np.stack(rgb, -1).astype(np.uint8)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  quality = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
  Image.fromarray(array).save(buf, format=fmt, **quality)
  return buf.getvalue()


def _read_back(out_dir, n: int, prefix: str = "train") -> dict:
  """All n records of the shards as one batch of the training pipeline (source order)."""
  cfg = {"source": f"arrayrecord:{out_dir}/{prefix}-*.array_record", "image_size": SIZE,
         "eval_size": 0, "shuffle": False, "prefetch": 0, "read_threads": 2}
  it = make_train_iterator(cfg, global_batch_size=n, seed=0, process_index=0, process_count=1)
  try:
    batch = next(it)
    assert it.stats()["bad"] == 0
  finally:
    it.close()
  return batch


def _close(a: np.ndarray, b: np.ndarray, tol: float = 4.0):
  err = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean()
  assert err <= tol, f"mean abs error {err} above {tol}"


def _add(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_webdataset(root) -> list:
  """Two tars plus a truncated one; returns the expected (pixels, caption, lossless) in order."""
  with tarfile.open(root / "shard-00000.tar", "w") as tar:
    _add(tar, "000.jpg", _encoded(_pixels(0), "JPEG"))
    _add(tar, "000.txt", b"a jpeg with a txt caption\n")
    _add(tar, "000.json", json.dumps({"caption": "ignored, the txt wins"}).encode())
    _add(tar, "001.png", _encoded(_pixels(1), "PNG"))
    _add(tar, "001.json", json.dumps({"caption": "caption from json", "url": "x"}).encode())
    _add(tar, "002.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")  # corrupt image
    _add(tar, "002.txt", b"corrupt")
    _add(tar, "003.png", _encoded(_pixels(3), "PNG"))  # no caption at all
  with tarfile.open(root / "shard-00001.tar", "w") as tar:
    _add(tar, "sub/004.webp", _encoded(_pixels(4), "WEBP"))
    _add(tar, "sub/004.json", json.dumps({"text": "webp with 'text' key"}).encode())
    _add(tar, "005.png", _encoded(_pixels(5), "PNG"))
    _add(tar, "005.txt", b"caf\xe9 latin-1")  # non-UTF-8 caption
    _add(tar, "006.txt", b"caption without image")
    _add(tar, "007.png", _encoded(_pixels(7), "PNG"))
    _add(tar, "007.json", json.dumps({"url": "no caption key"}).encode())
    _add(tar, "008.png", _encoded(_pixels(8), "PNG"))
    _add(tar, "008.txt", "  unicode caption \u00e9\u4e2d  ".encode())
  # A third tar cut in the middle of its second image: the first example stays.
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    _add(tar, "009.png", _encoded(_pixels(9), "PNG"))
    _add(tar, "009.txt", b"before the cut")
    _add(tar, "010.png", _encoded(_pixels(10, 200, 200), "PNG"))
  with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
    cut = tar.getmember("010.png").offset_data + 100
  (root / "shard-00002.tar").write_bytes(buf.getvalue()[:cut])
  return [(_pixels(0), "a jpeg with a txt caption", False),
          (_pixels(1), "caption from json", True),
          (_pixels(4), "webp with 'text' key", False),
          (_pixels(8), "unicode caption \u00e9\u4e2d", True),
          (_pixels(9), "before the cut", True)]


def test_webdataset_round_trip_and_skips(tmp_path):
  (tmp_path / "wds").mkdir()
  expected = _write_webdataset(tmp_path / "wds")
  out = tmp_path / "out"
  summary = prep.prepare(str(tmp_path / "wds" / "*.tar"), "webdataset", str(out),
                         records_per_shard=2, threads=3)
  assert summary["records_written"] == len(expected)
  assert summary["skipped_by_kind"] == {"bad_image": 1, "bad_tar": 1, "bad_text": 1,
                                        "missing_caption": 2, "missing_image": 1}
  assert summary["shards"] == ["train-00000.array_record", "train-00001.array_record",
                               "train-00002.array_record"]
  reasons = {e["id"].rsplit(":", 1)[-1]: e["kind"] for e in summary["skipped_examples"]}
  assert reasons["002"] == "bad_image" and reasons["005"] == "bad_text"
  assert reasons["003"] == reasons["007"] == "missing_caption" and reasons["006"] == "missing_image"
  assert json.loads((out / "prepare_summary.json").read_text()) == summary
  assert summary["data_source"] == f"arrayrecord:{out}/train-*.array_record"

  batch = _read_back(out, len(expected))
  assert list(batch["caption"]) == [c for _, c, _ in expected]
  for got, (want, _, lossless) in zip(batch["image"], expected):
    if lossless:
      np.testing.assert_array_equal(got, want)
    else:
      _close(got, want)

  # The same output whatever the thread count; --max_records stops early; no silent mixing.
  again = prep.prepare(str(tmp_path / "wds"), "webdataset", str(tmp_path / "inline"),
                       records_per_shard=2, threads=0)
  for name in summary["shards"]:
    a = sources.ArrayRecordSource(str(out / name))
    b = sources.ArrayRecordSource(str(tmp_path / "inline" / name))
    assert [a[i]["image"] for i in range(len(a))] == [b[i]["image"] for i in range(len(b))]
  assert again["records_written"] == len(expected)
  with pytest.raises(DataError, match="already holds 3 'train-\\*.array_record' shards"):
    prep.prepare(str(tmp_path / "wds"), "webdataset", str(out))
  short = prep.prepare(str(tmp_path / "wds"), "webdataset", str(out), max_records=2,
                       overwrite=True)
  assert short["records_written"] == 2 and short["stopped_at_max_records"]
  assert sorted(p for p in os.listdir(out) if p.endswith(".array_record")) == [
      "train-00000.array_record"]

  # --keep_uncaptioned: caption None, which the pipeline counts as a caption fallback.
  kept = prep.prepare(str(tmp_path / "wds"), "webdataset", str(tmp_path / "kept"),
                      options=prep.PrepareOptions(keep_uncaptioned=True))
  assert kept["records_written"] == 8 and kept["uncaptioned_kept"] == 3
  cfg = {"source": f"arrayrecord:{tmp_path}/kept/*.array_record", "image_size": SIZE,
         "eval_size": 0, "shuffle": False, "prefetch": 0, "read_threads": 2}
  it = make_train_iterator(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1)
  assert sum(c == "" for c in next(it)["caption"]) == 3
  assert it.stats()["caption_fallback"] == 3
  it.close()


def test_folder_with_captions_and_resize(tmp_path):
  root = tmp_path / "images"
  (root / "sub").mkdir(parents=True)
  Image.fromarray(_pixels(0)).save(root / "a.png")
  Image.fromarray(_pixels(1, 96, 64)).save(root / "sub" / "b.png")  # resized to 64x48 (-> JPEG)
  Image.fromarray(_pixels(2)).save(root / "c.png")  # no caption entry -> skipped
  (root / "broken.jpg").write_bytes(b"")
  lines = [{"file": "a.png", "caption": "first"}, {"file": "sub/b.png", "caption": "second"},
           {"file": "broken.jpg", "caption": "empty file"}]
  (root / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  out = tmp_path / "out"
  summary = prep.prepare(str(root), "folder", str(out), prefix="val",
                         options=prep.PrepareOptions(image_size=SIZE, jpeg_quality=90))
  assert summary["records_written"] == 2 and os.path.exists(out / "prepare_summary-val.json")
  assert summary["skipped_by_kind"] == {"bad_image": 1, "missing_caption": 1}
  records = sources.ArrayRecordSource(str(out / "val-*.array_record"))
  assert records[0]["image"] == (root / "a.png").read_bytes()  # small enough: bytes kept
  resized = Image.open(io.BytesIO(records[1]["image"]))
  assert resized.format == "JPEG" and resized.size == (72, SIZE)

  batch = _read_back(out, 2, prefix="val")
  assert list(batch["caption"]) == ["first", "second"]
  np.testing.assert_array_equal(batch["image"][0], _pixels(0))
  want = Image.fromarray(_pixels(1, 96, 64)).resize((72, SIZE), Image.BICUBIC)
  _close(batch["image"][1], np.asarray(want)[:, 12:60], tol=2.0)  # the pipeline's centre crop

  # Without any captions the records hold images only.
  (root / "captions.jsonl").unlink()
  bare = prep.prepare(str(root), "folder", str(tmp_path / "bare"))
  assert bare["records_written"] == 3 and bare["skipped_by_kind"] == {"bad_image": 1}
  assert "caption" not in _read_back(tmp_path / "bare", 3)


def test_edit_jsonl_round_trip(tmp_path):
  (tmp_path / "imgs").mkdir()
  for name, i, fmt in (("s0.png", 0, "PNG"), ("t0.png", 1, "PNG"), ("s1.jpg", 2, "JPEG"),
                       ("t1.jpg", 3, "JPEG")):
    (tmp_path / "imgs" / name).write_bytes(_encoded(_pixels(i), fmt))
  (tmp_path / "imgs" / "wide.png").write_bytes(_encoded(_pixels(4, 64, SIZE), "PNG"))
  lines = [
      json.dumps({"source": "imgs/s0.png", "target": "imgs/t0.png", "instruction": "make it red",
                  "task": "recolour"}),
      json.dumps({"source": "imgs/s0.png", "target": "imgs/missing.png", "instruction": "x"}),
      json.dumps({"source": "imgs/s0.png", "target": "imgs/wide.png", "instruction": "widen"}),
      "{not json",
      json.dumps({"source": "imgs/s0.png", "target": "imgs/t0.png"}),
      "",
      json.dumps({"source": str(tmp_path / "imgs/s1.jpg"), "target": "imgs/t1.jpg",
                  "instruction": "add a cat"}),
  ]
  (tmp_path / "edits.jsonl").write_text("\n".join(lines) + "\n")
  out = tmp_path / "out"
  summary = prep.prepare(str(tmp_path / "edits.jsonl"), "edit_jsonl", str(out))
  assert summary["records_written"] == 2
  assert summary["skipped_by_kind"] == {"bad_line": 1, "missing_instruction": 1,
                                        "size_mismatch": 1, "unreadable_file": 1}
  batch = _read_back(out, 2)
  assert list(batch["instruction"]) == ["make it red", "add a cat"]
  assert list(batch["edit_kind"]) == ["recolour", ""]
  np.testing.assert_array_equal(batch["source_image"][0], _pixels(0))
  np.testing.assert_array_equal(batch["image"][0], _pixels(1))
  _close(batch["source_image"][1], _pixels(2))
  _close(batch["image"][1], _pixels(3))


def test_omniedit_parquet_round_trip_and_cli(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  rows = [  # (id, task, source, target, prompts, score)
      ("a", "object_swap", _encoded(_pixels(0), "PNG"), _encoded(_pixels(1), "PNG"),
       ["swap the cat", "replace the cat with a dog"], 9.0),
      ("b", "removal", _encoded(_pixels(2), "PNG"), b"\x89PNG broken", ["remove it"], 9.0),
      ("c", "style", _encoded(_pixels(3), "PNG"), _encoded(_pixels(4), "PNG"), [], 9.0),
      ("d", "add", _encoded(_pixels(5), "PNG"), _encoded(_pixels(6), "PNG"), ["add a hat"], 2.0),
      ("e", "add", _encoded(_pixels(7), "JPEG"), _encoded(_pixels(8), "JPEG"), ["add sun"], 8.0),
  ]
  table = pa.table({
      "omni_edit_id": [r[0] for r in rows], "task": [r[1] for r in rows],
      "src_img": pa.array([{"bytes": r[2], "path": f"{r[0]}_src.png"} for r in rows], image),
      "edited_img": pa.array([{"bytes": r[3], "path": None} for r in rows], image),
      "edited_prompt_list": pa.array([r[4] for r in rows], pa.list_(pa.string())),
      "width": [SIZE] * len(rows), "height": [SIZE] * len(rows),
      "o_score": [r[5] for r in rows],
  })
  (tmp_path / "data").mkdir()
  pq.write_table(table.slice(0, 3), tmp_path / "data" / "train-00000-of-00002.parquet")
  pq.write_table(table.slice(3), tmp_path / "data" / "train-00001-of-00002.parquet")
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(
      [sys.executable, "-m", "psvae_jax.tools.prepare", f"--input={tmp_path / 'data'}",
       "--format=omniedit_parquet", f"--out={out}", "--instructions=all", "--min_score=5",
       "--records_per_shard=2"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout)
  assert summary == json.loads((out / "prepare_summary.json").read_text())
  assert summary["records_written"] == 3 and summary["inputs_read"] == 5
  assert summary["skipped_by_kind"] == {"bad_image": 1, "below_min_score": 1,
                                        "missing_instruction": 1}
  assert any("(b)" in e["id"] for e in summary["skipped_examples"])

  batch = _read_back(out, 3)
  assert list(batch["instruction"]) == ["swap the cat", "replace the cat with a dog", "add sun"]
  assert list(batch["edit_kind"]) == ["object_swap", "object_swap", "add"]
  for k in (0, 1):
    np.testing.assert_array_equal(batch["source_image"][k], _pixels(0))
    np.testing.assert_array_equal(batch["image"][k], _pixels(1))
  _close(batch["image"][2], _pixels(8))

  with pytest.raises(DataError, match=r"no column\(s\) \['source'\]"):
    prep.prepare(str(tmp_path / "data"), "omniedit_parquet", str(tmp_path / "x"),
                 options=prep.PrepareOptions(source_column="source"))
