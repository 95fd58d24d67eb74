"""Damaged checkpoints and non-finite steps.

A step whose files were deleted or truncated after it was written, or whose write never finished,
is detected on resume: the run warns (naming the step and the cause), falls back to the newest
complete step and ends exactly like an uninterrupted run; with no complete step it stops unless
config.checkpoint.allow_fresh_start. A non-finite loss or gradient is caught at its step and
never written into a checkpoint.

Runs use a toy task (one linear layer on 32 px synthetic images) so that each takes seconds.
"""
import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import train as train_lib
from psvae_jax.data import make_train_iterator
from psvae_jax.storage_retry import RetryPolicy, StorageReadError
from psvae_jax.tasks import TASKS

from helpers.checkpoints import assert_same_checkpoint, restore_all
from helpers.toy_task import TOY_TASK_ENTRY, toy_config

pytestmark = pytest.mark.reliability


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setitem(TASKS, "toy", TOY_TASK_ENTRY)
  return toy_config


# --- damaging a step -------------------------------------------------------------------------

def _largest(step_dir, item):
  return max(glob.glob(os.path.join(step_dir, item, "**", "d", "*"), recursive=True),
             key=os.path.getsize)


def _truncate(path, size=7):
  with open(path, "r+b") as f:
    f.truncate(size)


# name -> (damage(step_dir), fragment of the reported cause with the step's checksum manifest,
# fragment without one (found when the data is read))
DAMAGE = {
    "truncated array file": (lambda d: _truncate(_largest(d, "state")), "has 7 bytes",
                             "unreadable data"),
    "deleted array file": (lambda d: os.remove(_largest(d, "ema")), "is missing",
                           "unreadable data"),
    "missing item": (lambda d: shutil.rmtree(os.path.join(d, "extras")),
                     "item 'extras' missing", "item 'extras' missing"),
    "truncated data-position file": (
        lambda d: _truncate(glob.glob(os.path.join(d, "data", "*.json"))[0], 20),
        "has 20 bytes", "unreadable data"),
    "truncated array metadata": (lambda d: _truncate(os.path.join(d, "state", "_METADATA")),
                                 "_METADATA missing or unreadable",
                                 "_METADATA missing or unreadable"),
    "missing step metadata": (lambda d: os.remove(os.path.join(d, ckpt_lib.STEP_METADATA_FILE)),
                              "saved items are unknown", "saved items are unknown"),
}


def _iterator():
  return make_train_iterator({"image_size": 32, "synthetic_size": 40, "eval_size": 8,
                              "prefetch": 0, "read_threads": 1},
                             global_batch_size=4, seed=0, process_index=0, process_count=1)


def _tree(offset):
  return {"w": jnp.arange(300.0) + offset, "b": {"c": jnp.full((3, 4), offset)}}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _two_steps(directory, checksums=True):
  """Steps 1 and 2 (state, ema, data position, config, extras); returns step 1's position."""
  it = _iterator()
  ckpt = ckpt_lib.Checkpointer(directory, checksums=checksums)
  next(it)
  position_1 = it.get_state()
  ckpt.save(1, state=_tree(1.0), ema=_tree(10.0), data_iterator=it, config_json="{}",
            extras={"mean": 1})
  ckpt.wait()
  next(it)
  ckpt.save(2, state=_tree(2.0), ema=_tree(20.0), data_iterator=it, config_json="{}",
            extras={"mean": 2})
  ckpt.close()
  it.close()
  return position_1


@pytest.fixture
def directory(tmp_path):
  """A checkpoint directory holding steps 1 and 2 (see _two_steps)."""
  path = str(tmp_path / "ckpt")
  _two_steps(path)
  return path


@pytest.mark.reliability(
    fault="damaged latest checkpoint: {damage}",
    expected="warning names step 2 and the cause; step 1 restored with its data position")
@pytest.mark.parametrize("checksums", [True, False], ids=["manifest", "no_manifest"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_step_falls_back_to_the_newest_complete_one(tmp_path, caplog, damage,
                                                                     checksums):
  directory = str(tmp_path / "ckpt")
  position_1 = _two_steps(directory, checksums)
  corrupt, with_manifest, without_manifest = DAMAGE[damage]
  cause = with_manifest if checksums else without_manifest
  corrupt(os.path.join(directory, "2"))

  ckpt = ckpt_lib.Checkpointer(directory)
  it = _iterator()
  with caplog.at_level(logging.WARNING):
    step, restored = ckpt.restore_newest(abstract_state=_abstract(_tree(0.0)),
                                         abstract_ema=_abstract(_tree(0.0)), data_iterator=it,
                                         set_aside=True)
  assert step == 1
  np.testing.assert_array_equal(restored["state"]["w"], _tree(1.0)["w"])
  np.testing.assert_array_equal(restored["ema"]["b"]["c"], _tree(10.0)["b"]["c"])
  assert restored["extras"] == {"mean": 1}
  assert it.get_state() == position_1  # the data position of step 1, not of the damaged step
  warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert "checkpoint step 2" in warnings and cause in warnings
  # The damaged step is kept aside for inspection; the run can write step 2 again.
  assert os.path.isdir(os.path.join(directory, "2" + ckpt_lib.SET_ASIDE_SUFFIX))
  assert ckpt.all_steps() == [1]
  ckpt.save(2, state=_tree(2.0), ema=_tree(20.0), data_iterator=it, config_json="{}")
  ckpt.close()
  it.close()
  assert ckpt_lib.Checkpointer(directory, create=False).all_steps() == [1, 2]


@pytest.mark.reliability(
    fault="restore() of a step whose 'extras' item is missing",
    expected="IncompleteCheckpointError; never a partial restore")
def test_direct_restore_of_a_damaged_step_is_never_partial(directory):
  shutil.rmtree(os.path.join(directory, "2", "extras"))
  ckpt = ckpt_lib.Checkpointer(directory, create=False)
  with pytest.raises(ckpt_lib.IncompleteCheckpointError, match=r"/2: .*item 'extras' missing"):
    ckpt.restore(2, abstract_state=_abstract(_tree(0.0)))


@pytest.mark.reliability(
    fault="leftover unfinished write (<step>.orbax-checkpoint-tmp)",
    expected="warning; removed; the newest complete step is restored")
def test_unfinished_write_is_reported_and_removed(directory, caplog):
  # What a process killed mid-save leaves: Orbax's temporary directory for step 3.
  unfinished = os.path.join(directory, "3" + ckpt_lib.UNFINISHED_MARKER)
  shutil.copytree(os.path.join(directory, "2"), unfinished)
  _truncate(_largest(unfinished, "state"))
  with caplog.at_level(logging.WARNING):
    ckpt = ckpt_lib.Checkpointer(directory)
  assert "3.orbax-checkpoint-tmp was never finalized" in caplog.text
  assert not os.path.exists(unfinished)
  step, _ = ckpt.restore_newest(abstract_state=_abstract(_tree(0.0)))
  assert step == 2
  ckpt.close()


@pytest.mark.reliability(
    fault="config.resume reads a run that is still writing",
    expected="the other run's unfinished write is left alone")
def test_reader_never_removes_another_runs_unfinished_write(directory):
  unfinished = os.path.join(directory, "3" + ckpt_lib.UNFINISHED_MARKER)
  os.makedirs(unfinished)  # a live run may still be writing it
  ckpt_lib.Checkpointer(directory, create=False).close()
  assert os.path.isdir(unfinished)


@pytest.mark.reliability(
    fault="no complete checkpoint at all",
    expected="CheckpointError listing each step's cause; fresh start only when allowed")
def test_no_complete_step_is_an_error_unless_fresh_start_is_allowed(directory):
  for step in ("1", "2"):
    DAMAGE["truncated array file"][0](os.path.join(directory, step))
  ckpt = ckpt_lib.Checkpointer(directory)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"no complete checkpoint \(step 2: file .* has 7 bytes.*step 1: "
                           r"file .* has 7 bytes.*allow_fresh_start"):
    ckpt.restore_newest(abstract_state=_abstract(_tree(0.0)), set_aside=True)
  assert ckpt.all_steps() == [1, 2]  # nothing moved: the next attempt stops again
  assert ckpt.restore_newest(abstract_state=_abstract(_tree(0.0)), allow_none_complete=True,
                             set_aside=True) is None
  assert ckpt.all_steps() == []
  ckpt.close()


@pytest.mark.reliability(
    fault="checkpoint of another model shape",
    expected="CheckpointError naming the shapes; no fallback to older steps")
def test_a_step_that_does_not_fit_the_model_is_not_skipped(directory):
  wider = {"w": jnp.zeros(301), "b": {"c": jnp.zeros((3, 4))}}
  ckpt = ckpt_lib.Checkpointer(directory)
  expected = r"w: checkpoint \(300,\) vs model \(301,\)"
  with pytest.raises(ckpt_lib.CheckpointError, match=expected) as e:
    ckpt.restore_newest(abstract_state=_abstract(wider), set_aside=True)
  assert not isinstance(e.value, ckpt_lib.IncompleteCheckpointError)
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


@pytest.mark.reliability(
    fault="storage unreachable while reading the latest step (UNAVAILABLE, every attempt)",
    expected="retried, then StorageReadError naming the step; no fallback, nothing set aside")
def test_transient_storage_error_is_not_taken_for_damage(directory, monkeypatch):
  ckpt = ckpt_lib.Checkpointer(directory, read_retry=RetryPolicy(retries=2, sleep=lambda s: None))

  def unavailable(*args, **kwargs):
    raise Exception("reading array") from ValueError("UNAVAILABLE: connection reset")
  monkeypatch.setattr(ckpt.manager, "restore", unavailable)
  with pytest.raises(StorageReadError, match=r"/2 failed after 3 attempts.*UNAVAILABLE"):
    ckpt.restore_newest(abstract_state=_abstract(_tree(0.0)), set_aside=True)
  assert ckpt.all_steps() == [1, 2]


@pytest.mark.reliability(
    fault="permission denied reading the latest step (PERMISSION_DENIED)",
    expected="CheckpointError saying to retry later; not retried, no fallback, nothing set aside")
def test_access_denied_is_not_taken_for_damage(directory, monkeypatch):
  ckpt = ckpt_lib.Checkpointer(directory, read_retry=RetryPolicy(sleep=pytest.fail))

  def denied(*args, **kwargs):
    raise Exception("reading array") from ValueError("PERMISSION_DENIED: gs://bucket/ckpt/2")
  monkeypatch.setattr(ckpt.manager, "restore", denied)
  with pytest.raises(ckpt_lib.CheckpointError, match="PERMISSION_DENIED.*retry") as e:
    ckpt.restore_newest(abstract_state=_abstract(_tree(0.0)), set_aside=True)
  assert not isinstance(e.value, ckpt_lib.IncompleteCheckpointError)
  assert ckpt.all_steps() == [1, 2]


@pytest.mark.reliability(
    fault="one byte flipped inside an array file of the latest step",
    expected="detected as damage (fall back to step 1)")
def test_flipped_byte_in_array_data_is_detected(tmp_path, caplog):
  rng = np.random.default_rng(0)
  values = {step: rng.standard_normal(4096).astype(np.float32) for step in (1, 2)}
  directory = str(tmp_path / "ckpt")
  ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
  for step, w in values.items():
    ckpt.save(step, state={"w": jnp.asarray(w)})
  ckpt.close()
  path = _largest(os.path.join(directory, "2"), "state")
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  with open(path, "wb") as f:
    f.write(data)
  ckpt = ckpt_lib.Checkpointer(directory)
  with caplog.at_level(logging.WARNING):
    step, restored = ckpt.restore_newest(abstract_state=_abstract({"w": jnp.zeros(4096)}))
  assert step == 1 and np.array_equal(restored["state"]["w"], values[1])
  assert "checkpoint step 2" in caplog.text and "changed since the save" in caplog.text


# --- through the training loop ---------------------------------------------------------------

@pytest.mark.reliability(
    fault="training resumed over a truncated latest step",
    expected="resumes from step 2; final checkpoint bit-identical to an uninterrupted run")
def test_run_resumes_past_a_damaged_step_and_ends_identical(tmp_path, toy, caplog):
  straight = str(tmp_path / "straight")
  train_lib.train(toy(), straight)

  resumed = str(tmp_path / "resumed")
  train_lib.train(toy(), resumed)
  _truncate(_largest(os.path.join(ckpt_lib.checkpoint_dir(resumed), "4"), "state"))
  with caplog.at_level(logging.WARNING):
    summary = train_lib.train(toy(), resumed)
  assert summary["source"] == "workdir step 2" and summary["final_step"] == 4
  assert "checkpoint step 4" in caplog.text and "has 7 bytes" in caplog.text
  step_a, a = restore_all(straight)
  step_b, b = restore_all(resumed)
  assert step_a == step_b == 4
  assert_same_checkpoint(a, b)


@pytest.mark.reliability(
    fault="training with its only checkpoint damaged",
    expected="stops with CheckpointError; checkpoint.allow_fresh_start=True starts fresh")
def test_run_with_no_complete_checkpoint_stops_or_starts_fresh(tmp_path, toy):
  workdir = str(tmp_path / "run")
  train_lib.train(toy(total_steps=2), workdir)
  _truncate(_largest(os.path.join(ckpt_lib.checkpoint_dir(workdir), "2"), "ema"))
  with pytest.raises(ckpt_lib.CheckpointError, match="no complete checkpoint.*step 2"):
    train_lib.train(toy(total_steps=2), workdir)
  summary = train_lib.train(toy(total_steps=2, **{"checkpoint.allow_fresh_start": True}), workdir)
  assert summary["source"] == "scratch" and summary["final_step"] == 2


# --- non-finite steps ------------------------------------------------------------------------

@pytest.mark.reliability(
    fault="NaN in the {nan_in} at step 3 (nonfinite='raise')",
    expected="NonFiniteError naming step 3; no checkpoint holds it")
@pytest.mark.parametrize("nan_in", ["loss", "gradient"])
def test_nonfinite_step_raises_naming_it_and_is_never_checkpointed(tmp_path, toy, nan_in):
  config = toy(**{"loss.nan_at_step": 3, "loss.nan_in": nan_in, "checkpoint_every": 1,
                  "total_steps": 6})
  workdir = str(tmp_path / "run")
  with pytest.raises(train_lib.NonFiniteError, match="at step 3"):
    train_lib.train(config, workdir)
  reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), create=False)
  assert reader.all_steps() == [1, 2, 3]  # step 3's update (the 4th) was never saved
  _, arrays = restore_all(workdir)
  assert all(np.isfinite(v).all() for k, v in arrays.items() if k != "data")


@pytest.mark.reliability(
    fault="NaN gradient at step 1 with nonfinite='skip'",
    expected="update skipped and counted; checkpoints finite")
def test_nonfinite_step_is_skipped_when_configured(tmp_path, toy):
  config = toy(**{"loss.nan_at_step": 1, "loss.nan_in": "gradient", "nonfinite": "skip"})
  workdir = str(tmp_path / "run")
  summary = train_lib.train(config, workdir)
  assert summary["final_step"] == 4 and summary["last_metrics"]["skipped_steps"] == 1
  _, arrays = restore_all(workdir)
  assert int(arrays["state/skipped"]) == 1
  assert all(np.isfinite(v).all() for k, v in arrays.items() if k != "data")
