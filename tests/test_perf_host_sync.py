"""The training loop reads nothing back from the device between logging steps.

A device-to-host read of a jax.Array goes through the array's `_value` property
(`jax.device_get`, `float`, `int`, `bool`, `.tolist()`, printing) or through numpy's
`asarray`/`array` (`np.asarray(x)`, `.item()`, which use the buffer protocol); the test counts
both on the loop's thread per step, with a one-layer task so the loop itself (not a model) is
what runs. On GPU/TPU the same stretches also run under
`jax.transfer_guard_device_to_host('disallow_explicit')`; on CPU that guard never fires (CPU
arrays already live in host memory), hence the counter.
"""
import contextlib
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helpers.configs import tiny_svae_config
from psvae_jax import train as train_lib
from psvae_jax.tasks.base import Task


class OneLayerTask(Task):
  """A linear map of the images' mean colour: the cheapest task the loop can run."""

  def build_model(self, rngs):
    return nnx.Linear(3, 2, rngs=rngs)

  def _out(self, model, batch):
    return model(jnp.mean(batch["image"].astype(jnp.float32) / 255.0, axis=(1, 2)))

  def loss(self, model, batch, rng, step):
    out = self._out(model, batch)
    return jnp.mean(out**2), {"out_mean": jnp.mean(out), "out_max": jnp.max(out)}

  def evaluate(self, model, batch, rng):
    return {"out_abs": jnp.mean(jnp.abs(self._out(model, batch)))}


def test_no_device_reads_between_logging_steps(tmp_path, monkeypatch):
  config = tiny_svae_config(**{"total_steps": 8, "log_every": 3, "eval_every": 3,
                               "checkpoint_every": 3, "checkpoint.async_save": False})
  logging_steps = {3, 6, 8}
  array_type = type(jnp.zeros(()))
  value = array_type._value
  loop_thread = threading.get_ident()
  reads: dict[int, int] = {}  # step number (1-based) -> device reads during that step
  current = {"step": 0}
  guard = contextlib.ExitStack()

  def count():
    if threading.get_ident() == loop_thread:
      reads[current["step"]] = reads.get(current["step"], 0) + 1

  def counted(self):
    count()
    return value.fget(self)

  def counting(convert):
    def wrapper(a, *args, **kwargs):
      if type(a) is array_type:
        count()
      return convert(a, *args, **kwargs)
    return wrapper

  def prepare_batch(self, batch):
    if sys._getframe(1).f_code.co_name != "_run_steps":  # eval and sample batches
      return Task.prepare_batch(self, batch)
    # The loop's call, first thing in every step: the previous step (its logging, eval and
    # checkpointing included) is over.
    guard.close()
    current["step"] += 1
    # Step 1 compiles the step, which reads its captured constants (the PRNG key) once.
    if current["step"] > 1 and current["step"] not in logging_steps:
      guard.enter_context(jax.transfer_guard_device_to_host("disallow_explicit"))
    return Task.prepare_batch(self, batch)

  monkeypatch.setattr(OneLayerTask, "prepare_batch", prepare_batch)
  monkeypatch.setattr(train_lib, "get_task", OneLayerTask)
  monkeypatch.setattr(array_type, "_value", property(counted))
  monkeypatch.setattr(np, "asarray", counting(np.asarray))
  monkeypatch.setattr(np, "array", counting(np.array))
  try:
    summary = train_lib.train(config, str(tmp_path), devices=jax.devices()[:1])
  finally:
    guard.close()
  assert summary["final_step"] == 8 and "eval/out_abs" in summary["last_eval"]
  quiet = {step: reads.get(step, 0) for step in (2, 4, 5, 7)}
  assert not any(quiet.values()), reads
  assert all(reads.get(step, 0) > 0 for step in logging_steps), reads  # the counter works
