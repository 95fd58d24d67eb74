"""The grain pipelines: batches, determinism, per-process sharding, checkpointable state (also
through Orbax), bad-record accounting and the held-out eval batches."""
import io

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from helpers.batches import assert_same_batch as _same
from helpers.images import png_with_header_size

from psvae_jax.data import DataError, loader, make_eval_batches, make_train_iterator
from psvae_jax.data.decode import encode_image
from psvae_jax.data.errors import MIN_RECORDS_FOR_BAD_CHECK

SMALL = {"image_size": 32, "synthetic_size": 40, "eval_size": 16, "prefetch": 0, "read_threads": 2}


def _iterator(cfg=None, *, batch=8, seed=0, index=0, count=1):
  return make_train_iterator({**SMALL, **(cfg or {})}, global_batch_size=batch, seed=seed,
                             process_index=index, process_count=count)


def _take(it, n):
  out = [next(it) for _ in range(n)]
  return out




def test_batch_layout_and_determinism():
  it = _iterator()
  batches = _take(it, 3)
  b = batches[0]
  assert b["image"].dtype == np.uint8 and b["image"].shape == (8, 32, 32, 3)
  assert b["label"].dtype == np.int32 and b["caption"].dtype == object
  assert all(isinstance(c, str) and c for c in b["caption"])
  again = _take(_iterator(), 3)
  for x, y in zip(batches, again):
    _same(x, y)
  other = next(_iterator(seed=1))
  assert list(other["scene"]) != list(b["scene"])
  edits = next(_iterator({"source": "synthetic:edits"}, batch=4))
  assert edits["source_image"].shape == (4, 32, 32, 3) and edits["edit_mask"].shape == (4, 32, 32)
  assert edits["edit_mask"].dtype == bool and edits["instruction"].dtype == object
  it.close()


def test_epochs_cover_the_data_and_reshuffle():
  it = _iterator(batch=8)
  epoch1 = [s for b in _take(it, 5) for s in b["scene"]]
  epoch2 = [s for b in _take(it, 5) for s in b["scene"]]
  assert len(set(epoch1)) == 40 and set(epoch1) == set(epoch2) and epoch1 != epoch2
  ordered = _iterator({"shuffle": False}, batch=8)
  first = [s for b in _take(ordered, 5) for s in b["scene"]]
  assert set(first) == set(epoch1) and first != epoch1


def test_processes_read_disjoint_slices_of_one_global_order():
  global_batches = _take(_iterator(batch=8), 5)  # one epoch of the 40 examples
  per_process = [_take(_iterator(batch=8, index=p, count=2), 5) for p in range(2)]
  seen = [{s for b in batches for s in b["scene"]} for batches in per_process]
  assert len(seen[0]) == len(seen[1]) == 20 and not seen[0] & seen[1]
  for k in range(5):  # the local batches k of both processes make up global batch k
    assert per_process[0][k]["image"].shape[0] == 4
    union = set(per_process[0][k]["scene"]) | set(per_process[1][k]["scene"])
    assert union == set(global_batches[k]["scene"])


def test_state_round_trip_mid_epoch_and_across_epochs():
  it = _iterator(batch=6)
  _take(it, 4)  # 24 of 40: mid-epoch
  state = it.get_state()
  expected = _take(it, 5)  # crosses into the second epoch
  fresh = _iterator(batch=6)
  fresh.set_state(state)
  for x, y in zip(expected, _take(fresh, 5)):
    _same(x, y)
  assert fresh.stats() == it.stats()
  it.close()
  fresh.close()


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  it = _iterator({"prefetch": 2}, batch=4)  # thread prefetch on, as in training
  _take(it, 3)
  params = {"w": np.arange(6.0, dtype=np.float32)}
  with ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mngr:
    mngr.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                         data=grain.checkpoint.CheckpointSave(it)))
    # The iterator state is captured inside save(): training may go on while Orbax writes.
    expected = _take(it, 4)
    mngr.wait_until_finished()
  restored_it = _iterator({"prefetch": 2}, batch=4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(restored_it)))
  np.testing.assert_array_equal(restored.params["w"], params["w"])
  assert restored.data is restored_it
  for x, y in zip(expected, _take(restored_it, 4)):
    _same(x, y)
  it.close()
  restored_it.close()


def _zoo_folder(path, n_good=10):
  """n_good good images and one of each bad kind."""
  path.mkdir(exist_ok=True)
  for i in range(n_good):
    Image.fromarray(np.full((40, 40, 3), 10 * i, np.uint8)).save(path / f"good_{i:02d}.png")
  jpeg = encode_image(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), format="jpeg")
  (path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
  (path / "zero.jpg").write_bytes(b"")
  (path / "text.jpg").write_bytes(b"hello, not an image")
  buf = io.BytesIO()
  Image.new("RGB", (1, 1)).save(buf, format="PNG")
  (path / "tiny.png").write_bytes(buf.getvalue())
  (path / "bomb.png").write_bytes(png_with_header_size(20000, 20000))
  return 5


@pytest.mark.reliability(fault="folder with truncated, empty, non-image, 1x1 and 20000x20000 files",
                         expected="skipped and counted with their reasons")
def test_bad_records_are_skipped_and_counted(tmp_path):
  n_bad = _zoo_folder(tmp_path / "zoo")
  cfg = {"source": f"folder:{tmp_path / 'zoo'}", "eval_size": 0, "max_bad_fraction": 0.5}
  it = _iterator(cfg, batch=5)
  batches = _take(it, 2)  # one epoch of the 10 good images
  assert all(b["image"].shape == (5, 32, 32, 3) for b in batches)
  stats = it.stats()
  assert stats["seen"] - stats["bad"] == 10 and stats["bad"] <= n_bad
  _take(it, 2)
  stats = it.stats()
  assert stats["bad"] >= n_bad and stats["seen"] == stats["bad"] + 20
  reasons = " ".join(stats["examples_of_bad"])
  for fragment in ("empty file", "not a recognised image", "too small", "too many pixels", "truncated"):
    assert fragment in reasons
  it.close()


@pytest.mark.reliability(fault="bad records above data.max_bad_fraction (folder)",
                         expected="DataError naming examples")
def test_too_many_bad_records_raise_naming_examples(tmp_path):
  _zoo_folder(tmp_path / "zoo")
  cfg = {"source": f"folder:{tmp_path / 'zoo'}", "eval_size": 0, "max_bad_fraction": 0.05}
  it = _iterator(cfg, batch=5)
  with pytest.raises(DataError, match=r"above data.max_bad_fraction=0.05. Examples: .*zoo/"):
    for _ in range(MIN_RECORDS_FOR_BAD_CHECK):
      next(it)
  it.close()


@pytest.mark.reliability(fault="a source where every record is bad",
                         expected="DataError instead of an endless loop")
def test_a_source_with_no_usable_record_raises(tmp_path, monkeypatch):
  monkeypatch.setattr(loader, "MAX_CONSECUTIVE_BAD", 30)
  (tmp_path / "bad").mkdir()
  for i in range(3):
    (tmp_path / "bad" / f"{i}.jpg").write_bytes(b"")
  it = _iterator({"source": f"folder:{tmp_path / 'bad'}", "eval_size": 0}, batch=2)
  with pytest.raises(DataError, match="in a row and none usable.*empty file"):
    next(it)
  it.close()


def test_eval_batches_are_deterministic_and_held_out(tmp_path):
  ev = make_eval_batches(SMALL, batch_size=4, num_batches=3)
  again = make_eval_batches(SMALL, batch_size=4, num_batches=3)
  for x, y in zip(ev, again):
    _same(x, y)
  train_scenes = {s for b in _take(_iterator(batch=8), 5) for s in b["scene"]}
  assert not train_scenes & {s for b in ev for s in b["scene"]}
  # Folder: a fixed subset of eval_size images (at most 10% of the folder) is held out.
  for i in range(40):
    Image.fromarray(np.full((36, 36, 3), 6 * i, np.uint8)).save(tmp_path / f"{i:02d}.png")
  cfg = {"source": f"folder:{tmp_path}", "eval_size": 100}
  held = {int(v) for b in make_eval_batches({**SMALL, **cfg}, batch_size=2, num_batches=2)
          for v in b["image"][:, 0, 0, 0]}
  it = _iterator(cfg, batch=4)
  trained = {int(v) for b in _take(it, 9) for v in b["image"][:, 0, 0, 0]}
  assert len(held) == 4 and len(trained) == 36 and not held & trained
  it.close()
  # Fewer held-out images than batches need: the batches they fill, the last one completed.
  small = make_eval_batches({**SMALL, **cfg}, batch_size=3, num_batches=5)
  assert len(small) == 2 and {int(v) for b in small for v in b["image"][:, 0, 0, 0]} == held


def test_a_one_image_folder_cannot_hold_out_eval_data(tmp_path):
  Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(tmp_path / "only.png")
  with pytest.raises(DataError, match="too few to hold 1 out"):
    make_eval_batches({**SMALL, "source": f"folder:{tmp_path}"}, batch_size=1, num_batches=1)


def test_random_flip_is_deterministic(tmp_path):
  pixels = np.zeros((32, 32, 3), np.uint8)
  pixels[:, :16] = 255
  for i in range(8):
    Image.fromarray(pixels).save(tmp_path / f"{i}.png")
  cfg = {"source": f"folder:{tmp_path}", "eval_size": 0, "random_flip": True}
  a = next(_iterator(cfg, batch=8))["image"]
  b = next(_iterator(cfg, batch=8))["image"]
  np.testing.assert_array_equal(a, b)
  left_white = a[:, 0, 0, 0] == 255
  assert left_white.any() and not left_white.all()


@pytest.mark.reliability(fault="bad data config {cfg} {kwargs}",
                         expected="DataError: {msg}")
@pytest.mark.parametrize("cfg,kwargs,msg", [
    ({"colour_space": "rgb"}, {}, "unknown data config keys"),
    ({"image_size": 2}, {}, "image_size=2"),
    ({"max_bad_fraction": 1.5}, {}, "max_bad_fraction"),
    ({"worker_timeout_s": -1.0}, {}, "worker_timeout_s"),
    ({"worker_restarts": -1}, {}, "worker_restarts"),
    ({}, {"batch": 7, "count": 2}, "not a positive multiple"),
    ({}, {"index": 2, "count": 2}, "process_index=2"),
    ({"random_flip": True}, {}, "random_flip"),
    ({"source": "webdataset:/x"}, {}, "unknown data source scheme"),
])
def test_config_errors(cfg, kwargs, msg):
  with pytest.raises(DataError, match=msg):
    _iterator(cfg, **kwargs)


@pytest.mark.slow
def test_worker_processes_match_and_checkpoint(tmp_path):
  """num_workers=2: deterministic, counts bad records exactly, state round trip."""
  _zoo_folder(tmp_path / "zoo", n_good=16)
  cfg = {"source": f"folder:{tmp_path / 'zoo'}", "eval_size": 0, "max_bad_fraction": 0.5,
         "num_workers": 2}
  it = _iterator(cfg, batch=4)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 6)
  again = _iterator(cfg, batch=4)
  again.set_state(state)
  for x, y in zip(expected, _take(again, 6)):
    _same(x, y)
  stats = it.stats()
  assert stats["seen"] - stats["bad"] == 36 and stats["bad"] > 0
  it.close()
  again.close()
