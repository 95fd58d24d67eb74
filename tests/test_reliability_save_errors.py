"""Write errors during a save: disk full (ENOSPC), I/O error (EIO), permission lost (EACCES).

The errors are raised inside Orbax's array writes (tests/helpers/write_faults.py), in the
background commit of an async save or as the write starts; one test fills a real tmpfs. A failed
save is one CheckpointWriteError naming the step, the path and the free space; the newest
complete step stays intact and restorable (retention deletes older steps only after a newer one
is finalized); the half-written '<step>.orbax-checkpoint-tmp' is never taken for a step and is
removed. config.checkpoint.on_save_error decides whether the run stops or goes on to the next
save; the last save and the SIGTERM save stop the run either way. Resuming afterwards ends
bit-identical to an uninterrupted run. Runs use the toy task (seconds each).
"""
import errno
import logging
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import errors
from psvae_jax import train as train_lib
from psvae_jax.tasks import TASKS

from helpers.checkpoints import assert_same_checkpoint, restore_all
from helpers.configs import SVAE_SMOKE_FLAGS
from helpers.toy_task import TOY_TASK_ENTRY, toy_config
from helpers.write_faults import WriteFaults

pytestmark = pytest.mark.reliability

# name -> (errno, phase of the write it fails in, text of the error)
FAULTS = {
    "ENOSPC": (errno.ENOSPC, "commit", "No space left on device"),
    "EIO": (errno.EIO, "commit", "Input/output error"),
    "EACCES": (errno.EACCES, "start", "Permission denied"),
}
FREE_SPACE = r"[\d.]+ (B|KiB|MiB|GiB|TiB) free of [\d.]+ (B|KiB|MiB|GiB|TiB) on the filesystem of "


@pytest.fixture
def write_faults():
  faults = WriteFaults()
  faults.install()
  yield faults
  faults.uninstall()


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setitem(TASKS, "toy", TOY_TASK_ENTRY)
  return toy_config


def _tree(offset, n=300):
  return {"w": jnp.arange(float(n)) + offset, "b": jnp.full((3, 4), offset)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _listing(directory):
  return sorted(os.listdir(directory))


def _assert_one_line(error, step, directory, text, newest):
  message = errors.message(error)
  assert isinstance(error, errors.UserError) and "\n" not in str(error)
  assert message.startswith(f"checkpoint step {step} could not be saved to {directory}: ")
  assert text in message
  assert re.search(FREE_SPACE + re.escape(directory), message), message
  assert message.endswith(f"the newest complete step is {newest}")


# --- the Checkpointer ------------------------------------------------------------------------

@pytest.mark.reliability(
    fault="{fault} while saving step 2 (async={async_save}, keep=1)",
    expected="one-line error naming step 2, path, free space; step 1 intact and restorable; "
             "next save works")
@pytest.mark.parametrize("async_save", [True, False])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_failed_save_is_named_and_the_last_complete_step_survives(tmp_path, write_faults, fault,
                                                                  async_save):
  directory = str(tmp_path / "ckpt")
  ckpt = ckpt_lib.Checkpointer(directory, keep=1, async_save=async_save)
  ckpt.save(1, state=_tree(1.0))
  ckpt.wait()
  code, phase, text = FAULTS[fault]
  write_faults.fail(2, code, phase)
  with pytest.raises(ckpt_lib.CheckpointWriteError) as failure:
    ckpt.save(2, state=_tree(2.0))
    ckpt.wait()  # an async save fails in the background: reported here, naming step 2
  assert write_faults.injected and failure.value.step == 2
  _assert_one_line(failure.value, 2, directory, text, newest=1)
  # Retention (keep=1) would have removed step 1 once step 2 was committed: it was not.
  assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
  restored = ckpt.restore(1, abstract_state=_abstract(_tree(0.0)))
  np.testing.assert_array_equal(restored["state"]["w"], _tree(1.0)["w"])
  # A restarted run sees step 1 only (a leftover unfinished write is never a step).
  assert ckpt_lib.Checkpointer(directory, create=False).all_steps() == [1]
  # The next save works; then retention removes step 1, and no unfinished write is left.
  ckpt.save(3, state=_tree(3.0))
  ckpt.close()
  assert _listing(directory) == ["3"]


@pytest.mark.reliability(
    fault="keep=1: step 1 saved, step 2's async write still running",
    expected="step 1 stays on disk until step 2 is finalized, then retention removes it")
def test_retention_removes_an_old_step_only_after_the_new_one_is_finalized(tmp_path,
                                                                           write_faults):
  directory = str(tmp_path / "ckpt")
  ckpt = ckpt_lib.Checkpointer(directory, keep=1)
  ckpt.save(1, state=_tree(1.0))
  ckpt.wait()
  release = write_faults.hold(2)
  ckpt.save(2, state=_tree(2.0))
  time.sleep(0.5)  # the background commit of step 2 is waiting for `release`
  names = _listing(directory)
  assert "1" in names and "2" not in names
  assert any(n.startswith("2" + ckpt_lib.UNFINISHED_MARKER) for n in names)
  release.set()
  ckpt.wait()
  assert _listing(directory) == ["2"]
  ckpt.close()


@pytest.mark.reliability(
    fault="ENOSPC saving step 4 with keep=1, keep_every=2 (steps 1-3 saved)",
    expected="steps 2 (kept by keep_every) and 3 stay; step 5 then replaces 3")
def test_failed_save_with_keep_every(tmp_path, write_faults):
  directory = str(tmp_path / "ckpt")
  ckpt = ckpt_lib.Checkpointer(directory, keep=1, keep_every=2)
  for step in (1, 2, 3):
    ckpt.save(step, state=_tree(float(step)))
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  write_faults.fail(4, errno.ENOSPC)
  ckpt.save(4, state=_tree(4.0))
  with pytest.raises(ckpt_lib.CheckpointWriteError, match="step 4 .*newest complete step is 3"):
    ckpt.save(5, state=_tree(5.0))  # the failure of step 4 surfaces here; 5 is not started
  assert ckpt.all_steps() == [2, 3] and _listing(directory) == ["2", "3"]
  ckpt.save(5, state=_tree(5.0))
  ckpt.close()
  assert _listing(directory) == ["2", "5"]


@pytest.mark.reliability(
    fault="{fault} saving step 2 with on_save_error='retry'",
    expected="a warning naming step 2, path and free space; step 3 is saved")
@pytest.mark.parametrize("fault", list(FAULTS))
def test_retry_mode_warns_and_the_next_save_goes_ahead(tmp_path, write_faults, caplog, fault):
  directory = str(tmp_path / "ckpt")
  ckpt = ckpt_lib.Checkpointer(directory, keep=1, on_save_error="retry")
  ckpt.save(1, state=_tree(1.0))
  code, phase, text = FAULTS[fault]
  write_faults.fail(2, code, phase)
  with caplog.at_level(logging.WARNING):
    ckpt.save(2, state=_tree(2.0))
    assert ckpt.save(3, state=_tree(3.0))
    ckpt.wait()
  assert ckpt.failed_saves == [2] and ckpt.all_steps() == [3]
  warning = next(r.getMessage() for r in caplog.records
                 if "checkpoint step 2 could not be saved" in r.getMessage())
  assert text in warning and re.search(FREE_SPACE + re.escape(directory), warning)
  assert "the next save tries again" in warning
  ckpt.close()
  assert _listing(directory) == ["3"]


@pytest.mark.reliability(fault="manifest (checksums.json) write fails with ENOSPC",
                         expected="error names the step; the step stays and restores unchecked")
def test_failed_manifest_write_leaves_a_restorable_step(tmp_path, monkeypatch):
  directory = str(tmp_path / "ckpt")
  ckpt = ckpt_lib.Checkpointer(directory)

  def disk_full(step_dir):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{step_dir}/checksums.json.tmp")
  monkeypatch.setattr(ckpt_lib.checksums, "write_manifest", disk_full)
  ckpt.save(1, state=_tree(1.0))
  with pytest.raises(ckpt_lib.CheckpointWriteError,
                     match=r"step 1 was saved but its checksum manifest \(checksums\.json\) "
                           r"could not be written .*"
                           r"No space left.*newest complete step is 1"):
    ckpt.wait()
  monkeypatch.undo()
  restored = ckpt_lib.Checkpointer(directory).restore(1, abstract_state=_abstract(_tree(0.0)))
  np.testing.assert_array_equal(restored["state"]["w"], _tree(1.0)["w"])


@pytest.mark.reliability(fault="save failure on gs:// (no filesystem to ask for free space)",
                         expected="the message says the free space is unknown on gs://")
def test_free_space_of_object_storage_is_said_to_be_unknown():
  assert "gs:// is object storage" in ckpt_lib.free_space("gs://bucket/run/checkpoints")


# --- a real full disk ------------------------------------------------------------------------

@pytest.fixture
def small_filesystem(tmp_path):
  """mount(size) -> the path of a tmpfs of that size ('1m'); needs root and permission to
  mount, skipped where that is refused. Unmounted afterwards."""
  mounted = []

  def mount(size: str) -> str:
    mount_point = tmp_path / f"tmpfs_{size}"
    mount_point.mkdir()
    try:
      done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                             str(mount_point)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
      pytest.skip(f"cannot mount a tmpfs here: {e}")
    if done.returncode != 0:
      pytest.skip(f"cannot mount a tmpfs here: {(done.stderr or done.stdout).strip()}")
    mounted.append(str(mount_point))
    return str(mount_point)

  yield mount
  for path in mounted:
    subprocess.run(["umount", "-l", path], check=False, timeout=30)


@pytest.mark.reliability(fault="real full disk (1 MiB tmpfs) while saving step 2",
                         expected="error from TensorStore names step, path, free space; step 1 "
                                  "restorable; the space is freed and step 3 fits")
def test_real_full_disk(small_filesystem):
  directory = os.path.join(small_filesystem("1m"), "ckpt")
  ckpt = ckpt_lib.Checkpointer(directory, keep=1, checksums=False)
  small = _tree(1.0)
  ckpt.save(1, state=small)
  ckpt.wait()
  noise = {"w": jax.random.normal(jax.random.key(0), (400_000,)), "b": small["b"]}  # 1.6 MB
  ckpt.save(2, state=noise)
  with pytest.raises(ckpt_lib.CheckpointWriteError) as failure:
    ckpt.wait()
  _assert_one_line(failure.value, 2, directory, "No space left on device", newest=1)
  assert _listing(directory) == ["1"]  # the partial write of step 2 is gone: space freed
  restored = ckpt.restore(1, abstract_state=_abstract(small))
  np.testing.assert_array_equal(restored["state"]["w"], small["w"])
  ckpt.save(3, state=_tree(3.0))
  ckpt.close()
  assert _listing(directory) == ["3"]


# --- through the training loop ---------------------------------------------------------------

@pytest.fixture
def straight(tmp_path, toy):
  """An uninterrupted 6-step toy run (checkpoints at 2, 4, 6): its final checkpoint."""
  workdir = str(tmp_path / "straight")
  train_lib.train(toy(total_steps=6), workdir)
  return restore_all(workdir)


@pytest.mark.reliability(
    fault="{fault} saving step 4 of 6 (on_save_error='stop')",
    expected="run stops naming step 4; step 2 intact; resume ends bit-identical")
@pytest.mark.parametrize("fault", list(FAULTS))
def test_stop_mode_then_resume_is_bit_identical(tmp_path, toy, straight, write_faults, fault):
  workdir = str(tmp_path / "run")
  code, phase, text = FAULTS[fault]
  write_faults.fail(4, code, phase)
  with pytest.raises(ckpt_lib.CheckpointWriteError) as failure:
    train_lib.train(toy(total_steps=6), workdir)
  directory = ckpt_lib.checkpoint_dir(workdir)
  _assert_one_line(failure.value, 4, os.path.abspath(directory), text, newest=2)
  assert ckpt_lib.Checkpointer(directory, create=False).all_steps() == [2]
  write_faults.faults.clear()
  summary = train_lib.train(toy(total_steps=6), workdir)
  assert summary["source"] == "workdir step 2" and summary["final_step"] == 6
  assert_same_checkpoint(restore_all(workdir)[1], straight[1])


@pytest.mark.reliability(
    fault="ENOSPC saving step 4 of 6 (on_save_error='retry')",
    expected="warning; training goes on; step 6 saved; final state bit-identical")
def test_retry_mode_trains_on_and_ends_identical(tmp_path, toy, straight, write_faults, caplog):
  workdir = str(tmp_path / "run")
  write_faults.fail(4, errno.ENOSPC)
  with caplog.at_level(logging.WARNING):
    summary = train_lib.train(toy(total_steps=6, **{"checkpoint.on_save_error": "retry"}),
                              workdir)
  assert summary["final_step"] == 6 and summary["failed_saves"] == [4]
  assert "checkpoint step 4 could not be saved" in caplog.text
  assert ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), create=False).all_steps() == [2, 6]
  step, final = restore_all(workdir)
  assert step == 6
  assert_same_checkpoint(final, straight[1])


@pytest.mark.reliability(
    fault="ENOSPC at the last save of a run (on_save_error='retry')",
    expected="stops with the error (never silently lost); resume from step 4 ends identical")
def test_failed_final_save_stops_even_in_retry_mode(tmp_path, toy, straight, write_faults):
  workdir = str(tmp_path / "run")
  config = toy(total_steps=6, **{"checkpoint.on_save_error": "retry"})
  write_faults.fail(6, errno.ENOSPC)
  with pytest.raises(ckpt_lib.CheckpointWriteError, match="step 6 .*newest complete step is 4"):
    train_lib.train(config, workdir)
  write_faults.faults.clear()
  summary = train_lib.train(config, workdir)
  assert summary["source"] == "workdir step 4"
  assert_same_checkpoint(restore_all(workdir)[1], straight[1])


@pytest.mark.reliability(
    fault="SIGTERM at step 2 (a checkpoint step), its save {outcome}",
    expected="ok: saved once, exit 143; failed: stops with the write error even in retry mode")
@pytest.mark.parametrize("outcome", ["ok", "failed"])
def test_sigterm_save(tmp_path, toy, write_faults, monkeypatch, outcome):
  workdir = str(tmp_path / "run")
  monkeypatch.setattr(train_lib.PreemptionWatch, "should_stop", lambda self, step: step == 2)
  config = toy(total_steps=6, **{"checkpoint.on_save_error": "retry"})
  if outcome == "ok":
    with pytest.raises(train_lib.Preempted) as stop:
      train_lib.train(config, workdir)
    assert stop.value.code == 143 and stop.value.step == 2
    assert ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), create=False).all_steps() == [2]
    return
  write_faults.fail(2, errno.ENOSPC)
  with pytest.raises(ckpt_lib.CheckpointWriteError, match="step 2 .*no complete step is left"):
    train_lib.train(config, workdir)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = [*SVAE_SMOKE_FLAGS, "--config.log_every=2", "--config.checkpoint_every=2",
         "--config.checkpoint.keep=1"]


@pytest.mark.slow
@pytest.mark.reliability(
    fault="real full disk in a command-line run (8 MiB tmpfs, keep=1, about 5 MiB a step)",
    expected="exit 2, last line names step 4, the path, the free space and step 2; no "
             "project traceback; step 2 restorable")
def test_full_disk_in_a_command_line_run(tmp_path, small_filesystem):
  workdir = tmp_path / "run"
  workdir.mkdir()
  # The checkpoints live on the small filesystem; the log and metrics stay on the large one.
  os.symlink(small_filesystem("8m"), workdir / "checkpoints")
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
  done = subprocess.run([sys.executable, "-m", "psvae_jax.main", f"--workdir={workdir}", *SMOKE,
                         "--config.total_steps=6"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == errors.EXIT_USER_ERROR, done.stderr[-3000:]
  last = done.stderr.strip().splitlines()[-1]
  directory = str(workdir / "checkpoints")
  assert last.startswith(f"error: checkpoint step 4 could not be saved to {directory}: "), (
      done.stderr[-6000:])
  assert "No space left on device" in last and "free of 8.0 MiB on the filesystem of" in last
  assert last.endswith("the newest complete step is 2")
  # No traceback through the project's code (the run stopped on the reported error). asyncio
  # may still print 'Event loop is closed' for TensorStore writes that finish after Orbax
  # closed its event loop; that is Orbax's, not the run's.
  assert f"{os.sep}psvae_jax{os.sep}" not in done.stderr, done.stderr[-8000:]
  assert _listing(directory) == ["2"]
  step, arrays = restore_all(str(workdir))
  assert step == 2 and arrays
