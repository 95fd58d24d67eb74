"""Sources: spec parsing, image folders with captions, ArrayRecord shards, TFDS."""
import io
import json
import os

import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from psvae_jax.data import make_eval_batches, make_train_iterator, sources
from psvae_jax.data.decode import encode_image
from psvae_jax.data.errors import BadRecord, DataError
from psvae_jax.data.shards import ShardWriter, decode_record, encode_record


def _img(seed, h=48, w=40):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("spec,scheme,arg,split", [
    ("synthetic:shapes", "synthetic", "shapes", None),
    ("folder:/data/imgs", "folder", "/data/imgs", None),
    ("arrayrecord:/d/*.array_record", "arrayrecord", "/d/*.array_record", None),
    ("tfds:imagenet2012", "tfds", "imagenet2012", None),
    ("tfds:cifar10:train[:90%]", "tfds", "cifar10", "train[:90%]"),
])
def test_parse_source(spec, scheme, arg, split):
  assert sources.parse_source(spec) == sources.SourceSpec(scheme, arg, split)


@pytest.mark.reliability(fault="bad data.source {spec!r}",
                         expected="DataError: {msg}")
@pytest.mark.parametrize("spec,msg", [
    ("imagenet", "SCHEME:ARG"), ("s3:bucket/x", "unknown data source scheme 's3'"),
    ("folder:", "empty argument"), ("synthetic:cars", "unknown synthetic world 'cars'"),
    ("tfds::train", "names no TFDS dataset"),
])
def test_parse_source_errors(spec, msg):
  with pytest.raises(DataError, match=msg):
    sources.parse_source(spec)


@pytest.mark.reliability(fault="captions.jsonl with a broken line and a latin-1 caption",
                         expected="problems counted; those images get the empty caption")
def test_folder_with_captions_jsonl(tmp_path):
  (tmp_path / "sub").mkdir()
  names = ["a.jpg", "b.png", "sub/c.webp", "d.bmp", "e.JPEG"]
  for i, name in enumerate(names):
    Image.fromarray(_img(i)).save(tmp_path / name)
  (tmp_path / "notes.md").write_text("not an image")
  lines = [json.dumps({"file": "a.jpg", "caption": "first"}),
           json.dumps({"file": "sub/c.webp", "caption": "third"}),
           "{broken json",
           '{"file": "d.bmp", "caption": "caf\xe9"}'.encode("latin-1")]
  (tmp_path / "captions.jsonl").write_bytes(b"\n".join(
      line if isinstance(line, bytes) else line.encode() for line in lines))
  src = sources.FolderSource(str(tmp_path))
  assert len(src) == 5 and src.caption_mode == "jsonl"
  assert sorted(src.files) == sorted(os.path.normpath(n) for n in names)
  assert len(src.caption_problems) == 2  # the broken line and the latin-1 caption
  by_file = {os.path.relpath(src[i]["_id"], tmp_path): src[i] for i in range(len(src))}
  assert by_file["a.jpg"]["caption"] == "first"
  assert by_file[os.path.normpath("sub/c.webp")]["caption"] == "third"
  assert by_file["b.png"]["caption"] is None  # no entry -> empty caption, counted
  assert by_file["d.bmp"]["caption"] is None  # non-UTF-8 line -> empty caption, counted
  cfg = {"source": f"folder:{tmp_path}", "image_size": 32, "eval_size": 1, "prefetch": 0}
  it = make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (4, 32, 32, 3) and batch["caption"].dtype == object
  assert "label" not in batch
  assert it.stats()["caption_fallback"] == sum(c == "" for c in batch["caption"])
  it.close()


def test_folder_with_sidecar_captions(tmp_path):
  for i in range(3):
    Image.fromarray(_img(i)).save(tmp_path / f"{i}.png")
  (tmp_path / "0.txt").write_text("  zero  \n")
  (tmp_path / "1.txt").write_bytes(b"\xff\xfe bad")
  src = sources.FolderSource(str(tmp_path))
  assert src.caption_mode == "sidecar"
  assert [src[i]["caption"] for i in range(3)] == [b"zero", b"\xff\xfe bad", None]


def test_folder_without_captions_and_errors(tmp_path):
  Image.fromarray(_img(0)).save(tmp_path / "x.png")
  assert "caption" not in sources.FolderSource(str(tmp_path))[0]
  with pytest.raises(DataError, match="is not a directory"):
    sources.FolderSource(str(tmp_path / "missing"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError, match="holds no images"):
    sources.FolderSource(str(empty))


def test_record_encoding_round_trip():
  rec = {"image": b"\x89PNG...", "caption": "a cat", "label": 3, "score": 0.5, "ok": True,
         "none": None, "latent": np.arange(24, dtype=np.float16).reshape(2, 3, 4),
         "states": np.ones((2, 5), ml_dtypes.bfloat16), "mask": np.eye(3, dtype=bool),
         "big_endian": np.arange(4, dtype=">i4"), "n": np.int64(7)}
  out = decode_record(encode_record(rec))
  assert set(out) == set(rec)
  for key in ("latent", "states", "mask", "big_endian"):
    assert out[key].dtype == np.dtype(rec[key].dtype).newbyteorder("=") or out[key].dtype == rec[key].dtype
    np.testing.assert_array_equal(out[key], rec[key])
  assert out["n"] == 7 and out["caption"] == "a cat" and out["image"] == b"\x89PNG..."
  with pytest.raises(TypeError, match="cannot be stored"):
    encode_record({"x": np.array(["str"], dtype=object)})
  with pytest.raises(TypeError, match="cannot store"):
    encode_record({"x": {1, 2}})
  with pytest.raises(ValueError, match="not a valid record|not a version"):
    decode_record(b"\x93garbage")
  import pickle  # a pickle is refused as data, never executed
  with pytest.raises(ValueError):
    decode_record(pickle.dumps({"image": b""}))


def test_arrayrecord_round_trip_through_the_pipeline(tmp_path):
  images = [_img(i, 40, 40) for i in range(10)]
  with ShardWriter(str(tmp_path), "train", records_per_shard=4) as w:
    for i, im in enumerate(images):
      w.write({"image": encode_image(im), "caption": f"image {i}", "label": i,
               "latent": np.full((2, 2, 3), i, np.float32)})
  assert w.num_written == 10 and len(w.paths) == 3
  assert sorted(os.listdir(tmp_path)) == [f"train-0000{k}.array_record" for k in range(3)]
  src = sources.ArrayRecordSource(str(tmp_path / "train-*.array_record"))
  assert len(src) == 10
  rec = src[7]
  assert rec["caption"] == "image 7" and rec["label"] == 7 and rec["latent"][0, 0, 0] == 7
  cfg = {"source": f"arrayrecord:{tmp_path}/train-*.array_record", "image_size": 40,
         "eval_size": 0, "shuffle": False, "prefetch": 0}
  it = make_train_iterator(cfg, global_batch_size=5, seed=0, process_index=0, process_count=1)
  batch = next(it)
  assert list(batch["label"]) == [0, 1, 2, 3, 4] and batch["label"].dtype == np.int32
  assert list(batch["caption"]) == [f"image {i}" for i in range(5)]
  assert batch["latent"].shape == (5, 2, 2, 3) and batch["latent"].dtype == np.float32
  np.testing.assert_array_equal(batch["image"][3], images[3])  # PNG, same size: lossless
  it.close()
  with pytest.raises(DataError, match="matches no files"):
    sources.ArrayRecordSource(str(tmp_path / "nothing-*.array_record"))


def test_arrayrecord_edit_fields_and_raw_pixels(tmp_path):
  with ShardWriter(str(tmp_path), "edit", records_per_shard=100) as w:
    for i in range(4):
      mask = np.zeros((40, 60), bool)
      mask[:, :30] = True
      w.write({"image": _img(i, 40, 60), "source_image": encode_image(_img(i + 10, 40, 60)),
               "instruction": "make it blue", "edit_mask": mask})
  src = sources.ArrayRecordSource(str(tmp_path / "edit-*.array_record"))

  class Prep:
    image_size, max_image_pixels, min_image_size, skip_uncaptioned = 20, 10**8, 8, False
  from psvae_jax.data.preprocess import prepare_example
  ex = prepare_example(src[0], Prep())
  assert ex["image"].shape == ex["source_image"].shape == (20, 20, 3)
  assert ex["edit_mask"].shape == (20, 20)
  # Centre crop of 40x60 keeps columns 10..49: mask columns 10..29 -> left half of the output.
  assert ex["edit_mask"][:, :10].all() and not ex["edit_mask"][:, 10:].any()
  assert ex["instruction"] == "make it blue"


@pytest.mark.reliability(fault="undecodable ArrayRecord record",
                         expected="BadRecord naming the record")
def test_arrayrecord_bad_record_is_reported(tmp_path):
  from array_record.python import array_record_module
  path = str(tmp_path / "x-00000.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  writer.write(encode_record({"image": encode_image(_img(0))}))
  writer.write(b"definitely not msgpack \xc1")
  writer.close()
  src = sources.ArrayRecordSource(path)
  assert isinstance(src[1], BadRecord) and "#1" in src[1].record_id


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = str(tmp_path_factory.mktemp("tfds"))

  class TinyColours(tfds.core.GeneratorBasedBuilder):
    """Images of one flat colour; label = which colour."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
          "label": tfds.features.ClassLabel(num_classes=3),
          "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(12, 0), "validation": self._generate_examples(6, 100)}

    def _generate_examples(self, n, offset):
      for i in range(n):
        label = i % 3
        pixels = np.zeros((36, 44, 3), np.uint8)
        pixels[..., label] = 200
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        yield offset + i, {"image": buf.getvalue(), "label": label, "text": f"colour {label}"}

  TinyColours(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_source(tiny_tfds):
  src = sources.TfdsSource("tiny_colours", "train", tiny_tfds, caption_key="text")
  assert len(src) == 12
  rec = src[0]
  assert isinstance(rec["image"], bytes) and rec["label"] in (0, 1, 2)
  cfg = {"source": "tfds:tiny_colours", "tfds_data_dir": tiny_tfds, "image_size": 32,
         "caption_key": "text", "prefetch": 0}
  it = make_train_iterator(cfg, global_batch_size=6, seed=1, process_index=0, process_count=1)
  batch = next(it)
  it.close()
  assert batch["image"].shape == (6, 32, 32, 3)
  for img, label, text in zip(batch["image"], batch["label"], batch["caption"]):
    assert img[..., label].mean() > 190 and text == f"colour {label}"
  ev = make_eval_batches(cfg, batch_size=3, num_batches=2)  # the validation split
  assert [b["image"].shape for b in ev] == [(3, 32, 32, 3)] * 2
  with pytest.raises(DataError, match="no split 'test'"):
    sources.TfdsSource("tiny_colours", "test", tiny_tfds)
  with pytest.raises(DataError, match="no feature 'caption'"):
    sources.TfdsSource("tiny_colours", "train", tiny_tfds, caption_key="caption")
  with pytest.raises(DataError, match="tfds:no_such_dataset_xyz"):
    sources.TfdsSource("no_such_dataset_xyz", "train", tiny_tfds)
