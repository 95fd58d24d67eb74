"""The one training loop every stage runs through.

Mesh from config -> abstract model (`jax.eval_shape`) -> shardings from logical axes -> resume
(workdir, then config.resume, then config.init, then scratch) -> a single jitted, donated step
per batch -> periodic logging, eval, sampling and async Orbax checkpoints; SIGTERM saves first.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import config_base, console, fault_points, perf, runs, sharding
from psvae_jax import train_state as ts
from psvae_jax.metrics_log import RunLogger
from psvae_jax.optim import ema_update, learning_rate_schedule
from psvae_jax.preemption import Preempted, PreemptionWatch
from psvae_jax.storage_retry import RetryPolicy
from psvae_jax.tasks import get_task
from psvae_jax.tasks.base import Task


class NonFiniteError(FloatingPointError):
  """The loss or gradient norm became NaN/Inf (config.nonfinite='raise')."""


# --- the step ------------------------------------------------------------------------------

def make_train_step(task: Task, layout: ts.TrainSetup, config) -> Callable:
  """Pure `(state, ema, batch) -> (state, ema, metrics)`; non-finite updates are never applied.

  A non-finite loss or gradient norm leaves params, optimizer state and EMA unchanged and
  records the step in `state['nonfinite_step']` (first occurrence) and `state['skipped']`;
  the host raises (config.nonfinite='raise') at the next sync point, or carries on ('skip').
  """
  base_key = jax.random.key(config.seed)
  ema_decay = float(config.optim.ema_decay)
  skip_mode = config.nonfinite == "skip"
  schedule = learning_rate_schedule(config.optim, config.total_steps)

  def step_fn(state, ema, batch):
    step = state["step"]
    rng = jax.random.fold_in(base_key, step)

    def loss_fn(params):
      # Rebuild the non-differentiated states' Variables inside this trace: NNX only lets a
      # Variable (e.g. a BatchNorm statistic) be updated in the trace that created it.
      frozen, other = jax.tree.map(lambda x: x, (state["frozen"], state["other"]))
      model = layout.merge(params, frozen, other)
      loss, metrics = task.loss(model, batch, rng, step)
      other = nnx.split(model, *layout.filters)[3]
      return loss, (metrics, other)

    (loss, (metrics, other)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.global_norm(grads)
    updates, opt_state = layout.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # In raise mode nothing is applied after the first non-finite step, so the state the host
    # inspects (and would checkpoint) is the last good one.
    apply = finite if skip_mode else finite & (state["nonfinite_step"] < 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
    new_state = {
        "step": step + 1,
        "params": keep(params, state["params"]),
        "frozen": state["frozen"],
        "other": keep(other, state["other"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "nonfinite_step": jnp.where(~finite & (state["nonfinite_step"] < 0), step,
                                    state["nonfinite_step"]),
        "skipped": state["skipped"] + (~finite).astype(jnp.int32),
    }
    if ema is not None:
      ema = keep(ema_update(ema, new_state["params"], ema_decay), ema)
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": schedule(step)}
    return new_state, ema, metrics

  return step_fn


def jit_train_step(task: Task, layout: ts.TrainSetup, config) -> Callable:
  """The step the loop runs: `make_train_step` jitted with the state's and EMA's shardings in
  and out and both donated (updated in place). `tools.aot` lowers this same function."""
  return jax.jit(make_train_step(task, layout, config),
                 in_shardings=(layout.state_shardings, layout.ema_shardings, None),
                 out_shardings=(layout.state_shardings, layout.ema_shardings, None),
                 donate_argnums=(0, 1))


def make_eval_step(task: Task, layout: ts.TrainSetup, config) -> Callable:
  """Pure `(state, ema, batch) -> metrics`, evaluating the EMA weights when they exist."""
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 0x7FFFFFFF)

  def eval_fn(state, ema, batch):
    params = ema if ema is not None else state["params"]
    model = layout.merge(params, state["frozen"], state["other"])
    return task.evaluate(model, batch, eval_key)

  return eval_fn


def eval_model(layout: ts.TrainSetup, state, ema) -> nnx.Module:
  """The model with EMA params (if any), for sampling outside the step."""
  params = ema if ema is not None else state["params"]
  return layout.merge(params, state["frozen"], state["other"])


# --- resume --------------------------------------------------------------------------------

def separate_training_batches(task: Task, config, mesh, num_batches: int):
  """`num_batches` global training batches (prepared by the task) from an iterator seeded apart
  from the run's own, for `Task.finalize`; the iterator is closed afterwards."""
  from psvae_jax import data as data_lib

  iterator = data_lib.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed + 1,
      process_index=jax.process_index(), process_count=jax.process_count(),
      read_retry=RetryPolicy.from_config(config.io))
  try:
    for _ in range(num_batches):
      yield sharding.host_local_to_global(task.prepare_batch(next(iterator)), mesh)
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


def restore_or_init(task: Task, config, layout: ts.TrainSetup, checkpointer: ckpt_lib.Checkpointer,
                    data_iterator, mesh) -> tuple[dict, Any, str]:
  """Resume order: this workdir's newest complete checkpoint, config.resume, config.init, scratch.

  Damaged workdir steps are skipped with a warning and set aside; if steps exist but none is
  complete the run stops unless config.checkpoint.allow_fresh_start (ckpt_lib.restore_newest).
  """
  found = checkpointer.restore_newest(
      abstract_state=layout.abstract_state, abstract_ema=layout.abstract_ema,
      data_iterator=data_iterator, allow_none_complete=config.checkpoint.allow_fresh_start,
      set_aside=True)
  if found is not None:
    step, restored = found
    return _resumed(task, restored, checkpointer.directory, step, f"workdir step {step}")
  if config.resume:
    directory = ckpt_lib.resolve_checkpoint_dir(config.resume)
    other = ckpt_lib.Checkpointer(directory, create=False, async_save=False,
                                  read_retry=checkpointer.read_retry)
    try:
      found = other.restore_newest(abstract_state=layout.abstract_state,
                                   abstract_ema=layout.abstract_ema, data_iterator=data_iterator)
    finally:
      other.close()
    if found is None:
      raise ckpt_lib.CheckpointError(
          f"config.resume={config.resume!r}: no complete checkpoint under {directory}")
    step, restored = found
    return _resumed(task, restored, directory, step, f"resume {config.resume} step {step}")
  if not config.init:
    task.check_fresh_start()
  state = ts.init_state(task, config, layout)
  merged = runs.init_params(task, ts.all_params(state), config.init, mesh)
  state["params"], state["frozen"] = ts.split_params(layout, merged)
  source = f"init {config.init}" if config.init else "scratch"
  return state, ts.init_ema(state, layout), source


def _resumed(task: Task, restored: dict, directory: str, step: int,
             source: str) -> tuple[dict, Any, str]:
  ckpt_lib.log_restore(directory, step)
  task.restore_extras(restored.get("extras") or {})
  return restored["state"], restored.get("ema"), source


# --- the loop ------------------------------------------------------------------------------

def _check_batch_divisibility(config, mesh) -> None:
  dp = sharding.data_parallel_size(mesh)
  if config.batch_size % dp:
    raise config_base.ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
        f"{dp} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
  if config.batch_size % jax.process_count():
    raise config_base.ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by the process count "
        f"{jax.process_count()}")


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
  host = jax.device_get(pending)
  keys = host[0].keys()
  return {k: float(np.mean([np.asarray(m[k], np.float64) for m in host])) for k in keys}


def _raise_if_nonfinite(state, config) -> None:
  if config.nonfinite != "raise":
    return
  bad = int(jax.device_get(state["nonfinite_step"]))
  if bad >= 0:
    raise NonFiniteError(
        f"non-finite loss or gradient norm at step {bad}; the update was not applied and no "
        "checkpoint holds it (set config.nonfinite='skip' to skip such steps)")


def write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_base.to_json(config))


def train(config: ml_collections.ConfigDict, workdir: str, *,
          devices: list | None = None) -> dict[str, Any]:
  """Runs (or resumes) one stage to `config.total_steps`; returns a summary of the run."""
  from psvae_jax import data as data_lib

  started = time.perf_counter()
  config_base.validate(config, platform=(devices or jax.devices())[0].platform)
  _check_start_paths(config)
  config = runs.with_parent_config(config)
  task = get_task(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  _check_batch_divisibility(config, mesh)
  write_config(config, workdir)
  logger = RunLogger(workdir, tensorboard=config.logging.tensorboard)
  read_retry = RetryPolicy.from_config(config.io)
  checkpointer = ckpt_lib.Checkpointer(
      ckpt_lib.checkpoint_dir(workdir), keep=config.checkpoint.keep,
      keep_every=config.checkpoint.keep_every, async_save=config.checkpoint.async_save,
      checksums=config.checkpoint.checksums, on_save_error=config.checkpoint.on_save_error,
      read_retry=read_retry)
  watch = PreemptionWatch()
  peak = perf.peak_flops_per_device(config.logging.peak_flops_per_device, config.compute_dtype)
  summary: dict[str, Any] = {"workdir": workdir}
  try:
    with jax.set_mesh(mesh):
      # The data first: a bad source is reported before the model is built and compiled.
      data_iterator = data_lib.make_train_iterator(
          config.data, global_batch_size=config.batch_size, seed=config.seed,
          process_index=jax.process_index(), process_count=jax.process_count(),
          read_retry=read_retry)
      layout = ts.make_train_setup(task, config, mesh)
      state, ema, source = restore_or_init(task, config, layout, checkpointer, data_iterator,
                                           mesh)
      start = int(jax.device_get(state["step"]))
      summary.update(start_step=start, source=source,
                     trainable_params=ts.num_params(state["params"]),
                     frozen_params=ts.num_params(state["frozen"]))
      logging.info("start at step %d (%s); %d trainable / %d frozen params on mesh %s", start,
                   source, summary["trainable_params"], summary["frozen_params"],
                   dict(mesh.shape))
      if start >= config.total_steps:
        console.say("%s: already at step %d in %s, nothing to do", config.task, start, workdir)
        summary["final_step"] = start
        return summary
      console.say("%s: start in %s at step %d/%d (%s)", config.task, workdir, start,
                  config.total_steps, source)
      summary.update(_run_steps(task, config, workdir, layout, mesh, state, ema, start,
                                data_iterator, checkpointer, logger, watch, peak))
      console.say("%s: done, step %d in %s, %s: %s", config.task, summary["final_step"],
                  console.duration(time.perf_counter() - started), workdir,
                  console.headline(summary))
      return summary
  finally:
    watch.close()
    checkpointer.close()
    logger.close()


def _check_start_paths(config) -> None:
  """A missing config.init, config.resume or config.model.*_weights directory is reported
  before anything is built or compiled."""
  from etils import epath

  paths = {"init": config.get("init"), "resume": config.get("resume"),
           **{f"model.{k}": v for k, v in (config.get("model") or {}).items()
              if k.endswith("_weights")}}
  for key, path in paths.items():
    if isinstance(path, str) and path and not epath.Path(path).exists():
      raise ckpt_lib.CheckpointError(f"config.{key}={path!r}: no such directory (expected a "
                                     "run's workdir or a converted-weights directory)")


def _run_steps(task, config, workdir, layout, mesh, state, ema, start, data_iterator,
               checkpointer, logger, watch, peak) -> dict[str, Any]:
  from psvae_jax import data as data_lib

  step_fn = jit_train_step(task, layout, config)
  eval_fn = jax.jit(make_eval_step(task, layout, config))
  # Held-out batches for eval and for the end-of-run samples (identical on every process).
  eval_batches = data_lib.make_eval_batches(
      config.data, batch_size=config.batch_size, num_batches=max(config.eval_batches, 1),
      seed=config.seed, read_retry=checkpointer.read_retry)
  flops_per_example = task.flops_per_example()
  config_json = config_base.to_json(config)

  def save(step: int, force: bool = False, required: bool = False) -> None:
    """A failed save stops the run or is a warning (config.checkpoint.on_save_error); a
    `required` one (the last, the SIGTERM one) stops it either way."""
    _raise_if_nonfinite(state, config)
    extras = task.checkpoint_extras(eval_model(layout, state, ema))
    checkpointer.save(step, state=state, ema=ema, data_iterator=data_iterator,
                      config_json=config_json, extras=extras, force=force, required=required)

  def run_eval(step: int) -> dict[str, float]:
    results = [eval_fn(state, ema, sharding.host_local_to_global(
        task.prepare_batch(_local_slice(b)), mesh)) for b in eval_batches]
    if not results or not results[0]:
      return {}
    scalars = {f"eval/{k}": v for k, v in _mean_metrics(results).items()}
    logger.scalars(step, scalars)
    return scalars

  def run_sample(step: int) -> None:
    batch = sharding.host_local_to_global(task.prepare_batch(_local_slice(eval_batches[0])), mesh)
    images = task.sample(eval_model(layout, state, ema), jax.random.key(config.seed + step),
                         batch, step)
    logger.images(step, {k: _to_host(v) for k, v in images.items()})

  pending: list[dict] = []
  last_logged: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  t_log, steps_since_log = time.perf_counter(), 0
  step = start
  watch.begin(start, config.total_steps)
  for step in range(start, config.total_steps):
    fault_points.reached("data", step)
    host_batch = task.prepare_batch(next(data_iterator))
    batch = sharding.host_local_to_global(host_batch, mesh)
    state, ema, metrics = step_fn(state, ema, batch)
    fault_points.reached("step", step)
    pending.append(metrics)
    steps_since_log += 1
    done = step + 1
    is_last = done == config.total_steps
    if done % config.log_every == 0 or is_last:
      scalars = _mean_metrics(pending)
      pending.clear()
      _raise_if_nonfinite(state, config)
      now = time.perf_counter()
      scalars.update(perf.throughput(steps=steps_since_log, seconds=now - t_log,
                                     batch_size=config.batch_size,
                                     flops_per_example=flops_per_example, peak_per_device=peak))
      scalars["skipped_steps"] = float(jax.device_get(state["skipped"]))
      scalars.update(_data_stats(data_iterator))
      scalars["progress/eta_s"] = (config.total_steps - done) / max(
          scalars["perf/steps_per_s"], 1e-9)
      logger.scalars(done, scalars)
      console.say("%s: %s", config.task, console.progress_line(done, config.total_steps, scalars))
      last_logged = scalars
      t_log, steps_since_log = time.perf_counter(), 0
    if config.eval_every and (done % config.eval_every == 0 or is_last):
      last_eval = run_eval(done)
    if (config.sample_every and done % config.sample_every == 0) or is_last:
      run_sample(done)
    if is_last:
      task.finalize(eval_model(layout, state, ema),
                    lambda n: separate_training_batches(task, config, mesh, n))
    scheduled = (config.checkpoint_every and done % config.checkpoint_every == 0) or is_last
    if scheduled:
      save(done, required=is_last)
      fault_points.reached("save", step)
    fault_points.reached("between", step, wait=state)
    # Every process learns of a stop request at the same step (see preemption.PreemptionWatch).
    if watch.should_stop(done):
      if scheduled and done not in checkpointer.failed_saves:
        checkpointer.require(done)  # that save holds this step: its failure must stop the run
      else:
        save(done, force=True, required=True)
      checkpointer.wait()
      raise Preempted(done)
  checkpointer.wait()
  return {"final_step": step + 1, "last_metrics": last_logged, "last_eval": last_eval,
          "failed_saves": list(checkpointer.failed_saves)}


def _to_host(x) -> np.ndarray:
  """A (possibly multi-process) jax array or numpy array -> numpy on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _local_slice(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows of a global eval batch (eval batches are built identically everywhere)."""
  n, count, index = None, jax.process_count(), jax.process_index()
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    n = v.shape[0] // count
    out[k] = v[index * n:(index + 1) * n]
  return out


def _data_stats(data_iterator) -> dict[str, float]:
  """Counters of the data pipeline (records seen, bad records skipped, ...), if it has them."""
  stats = getattr(data_iterator, "stats", None)
  if stats is None:
    return {}
  values = stats()
  return {f"data/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))}
