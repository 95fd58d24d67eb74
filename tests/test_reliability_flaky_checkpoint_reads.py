"""Flaky storage under checkpoint restores: the first k reads of a step (Orbax's restore through
TensorStore, or the step's metadata file read before it) fail with a transient error
(tests/helpers/flaky_reads.py).

k up to config.io.retries: the step is restored, with k warnings naming it. More: one
StorageReadError naming the step, the attempts and the last error; the step is never taken for
a damaged one (no fallback to an older step, nothing set aside). config.io reaches the restores
of a training run and of the runs it reads (runs.load_run).
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import errors, runs
from psvae_jax import train as train_lib
from psvae_jax.storage_retry import RetryPolicy, StorageReadError
from psvae_jax.tasks import TASKS

from helpers.flaky_reads import FlakyReads
from helpers.toy_task import TOY_TASK_ENTRY, toy_config

pytestmark = pytest.mark.reliability

RETRIES = 2
NO_WAIT = {"io.retries": RETRIES, "io.initial_backoff_s": 0.0, "io.max_backoff_s": 0.0}


@pytest.fixture
def flaky(monkeypatch):
  return FlakyReads(monkeypatch)


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setitem(TASKS, "toy", TOY_TASK_ENTRY)
  return toy_config


def _tree(offset):
  return {"w": jnp.arange(300.0) + offset}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@pytest.fixture
def directory(tmp_path):
  path = str(tmp_path / "ckpt")
  ckpt = ckpt_lib.Checkpointer(path)
  for step in (1, 2):
    ckpt.save(step, state=_tree(float(step)))
  ckpt.close()
  return path


def _warnings(caplog, fragment):
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and fragment in r.getMessage()
          and "(attempt" in r.getMessage()]


# what fails -> (path fragment, text of the injected error)
READS = {"array data (Orbax restore)": ("ckpt/2", "UNAVAILABLE"),
         "step metadata file": ("ckpt/2/_CHECKPOINT_METADATA", "Input/output error")}


@pytest.mark.reliability(
    fault="flaky storage: first {k} reads of the latest checkpoint's {read} fail (retries=2)",
    expected="k <= 2: step 2 restored, k warnings naming it; k = 3: StorageReadError, no "
             "fallback to step 1")
@pytest.mark.parametrize("k", [1, RETRIES, RETRIES + 1])
@pytest.mark.parametrize("read", list(READS))
def test_checkpoint_restore_retries_transient_errors(directory, flaky, caplog, read, k):
  fragment, text = READS[read]
  ckpt = ckpt_lib.Checkpointer(directory, read_retry=RetryPolicy(retries=RETRIES,
                                                                 sleep=lambda s: None))
  flaky.fail(fragment, k)
  with caplog.at_level(logging.WARNING):
    if k > RETRIES:
      with pytest.raises(StorageReadError) as failure:
        ckpt.restore_newest(abstract_state=_abstract(_tree(0.0)), set_aside=True)
      message = errors.message(failure.value)
      assert f"restoring checkpoint {directory}/2 failed after {RETRIES + 1} attempts" in message
      assert text in message
      assert ckpt.all_steps() == [1, 2]  # not set aside as damaged
    else:
      step, restored = ckpt.restore_newest(abstract_state=_abstract(_tree(0.0)), set_aside=True)
      assert step == 2
      np.testing.assert_array_equal(restored["state"]["w"], _tree(2.0)["w"])
  lines = _warnings(caplog, fragment)
  assert len(lines) == min(k, RETRIES) and all(text in line for line in lines)
  assert not any("is incomplete or damaged" in r.getMessage() for r in caplog.records)


@pytest.fixture
def toy_run(tmp_path, toy):
  """A 2-step toy run (checkpoint at step 2); its workdir."""
  workdir = str(tmp_path / "run")
  train_lib.train(toy(total_steps=2), workdir)
  return workdir


@pytest.mark.reliability(
    fault="flaky storage: resuming a run whose checkpoint read fails {k} times (config.io.retries=2)",
    expected="k = 2: resumes from step 2; k = 3: one-line StorageReadError naming the step")
@pytest.mark.parametrize("k", [RETRIES, RETRIES + 1])
def test_training_resume_uses_config_io(toy_run, toy, flaky, caplog, k):
  flaky.fail(f"{ckpt_lib.checkpoint_dir(toy_run)}/2", k)
  config = toy(total_steps=4, **NO_WAIT)
  with caplog.at_level(logging.WARNING):
    if k > RETRIES:
      with pytest.raises(StorageReadError, match=r"checkpoints/2 failed after 3 attempts"):
        train_lib.train(config, toy_run)
      return
    summary = train_lib.train(config, toy_run)
  assert summary["source"] == "workdir step 2" and summary["final_step"] == 4
  assert len(_warnings(caplog, "checkpoints/2")) == k


@pytest.mark.reliability(
    fault="flaky storage: reading another run (runs.load_run) fails twice",
    expected="read after 2 warnings naming the run's step")
def test_reading_another_run_retries(toy_run, flaky, caplog):
  flaky.fail(f"{ckpt_lib.checkpoint_dir(toy_run)}/2", RETRIES)
  with caplog.at_level(logging.WARNING):
    run = runs.load_run(toy_run, runs.default_mesh(),
                        read_retry=RetryPolicy(retries=RETRIES, sleep=lambda s: None))
  assert run.step == 2
  # Both the stored config and the weights are read through the retrying policy.
  assert len(_warnings(caplog, "checkpoints/2")) == RETRIES
