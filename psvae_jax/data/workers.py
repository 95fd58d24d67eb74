"""The grain worker processes of a training pipeline: supervised, restarted at the exact position
or reported, and ended together with the training process.

grain itself notices a dead worker (its consumer polls the worker's queue every second and then
checks the exit code) but stops with a bare RuntimeError, and it waits forever on a worker that
lives but never delivers. SupervisedWorkerIterator adds:
- a watchdog thread that, while the consumer waits inside next() for longer than
  data.worker_timeout_s (the first batch of a (re)started pipeline: WORKER_START_S more, for the
  workers' start-up: spawn, imports, opening the source), stops the stuck workers, so grain
  reports them as dead; time the training loop spends elsewhere (compiling, evaluating,
  saving) never counts;
- on a dead worker, a restart of all workers from the pipeline position after the last delivered
  batch (the batches go on exactly as without the fault), at most data.worker_restarts times per
  launch; then DataError naming the worker, how it ended and what to do.
end_with_parent (a grain worker_init_fn) makes each worker exit once the training process is gone:
SIGKILL of the training process would otherwise leave its workers running, holding memory.
"""
import os
import signal
import threading
import time
import weakref
from multiprocessing.process import BaseProcess

from absl import logging
import grain

from psvae_jax.data.errors import DataError

PARENT_POLL_S = 1.0
WATCH_POLL_S = 0.5
WORKER_START_S = 120.0


def end_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
  """grain worker_init_fn (bind `parent_pid` first): a daemon thread ends this worker process
  as soon as `parent_pid` is no longer its parent (the training process died; the worker was
  re-parented)."""
  del worker_index, worker_count

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(PARENT_POLL_S)
    os._exit(1)  # no cleanup: nobody is left to read this worker's output

  threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def worker_processes(iterator: grain.DatasetIterator) -> list[BaseProcess]:
  """The started worker processes under a grain iterator.

  grain's process-prefetch iterators keep their process as an attribute; the walk follows
  attributes that are iterators or lists/tuples of iterators (interleave keeps its shards in a
  list). grain drops the attribute when it stops a worker, so callers remember what they saw.
  """
  found, stack, seen = [], [iterator], set()
  while stack:
    node = stack.pop()
    if id(node) in seen:
      continue
    seen.add(id(node))
    for value in list(vars(node).values()):
      for item in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(item, BaseProcess) and item.pid is not None:
          found.append(item)
        elif isinstance(item, grain.DatasetIterator):
          stack.append(item)
  return found


def describe_exit(exitcode: int) -> str:
  """'was killed by SIGKILL (...)' or 'exited with status N' for a process's exit code."""
  if exitcode >= 0:
    return f"exited with status {exitcode}"
  try:
    name = signal.Signals(-exitcode).name
  except ValueError:
    name = f"signal {-exitcode}"
  if -exitcode == signal.SIGKILL:
    name += " (sent e.g. by the kernel's OOM killer when host memory runs out)"
  return f"was killed by {name}"


class SupervisedWorkerIterator(grain.DatasetIterator):
  """Iterates `dataset` (a grain pipeline ending in mp_prefetch) and replaces its workers when one
  dies or stalls (see the module docstring). get_state/set_state are the pipeline's own, so
  checkpoints do not depend on the supervision."""

  def __init__(self, dataset: grain.IterDataset, *, num_workers: int, timeout_s: float,
               max_restarts: int, description: str):
    super().__init__(dataset.__iter__())
    self._dataset = dataset
    self._num_workers = num_workers
    self._timeout_s = timeout_s
    self._max_restarts = max_restarts
    self._description = description
    self.restarts = 0
    self._batches = 0
    # The pipeline position after the last delivered batch (None: its start): where a restart
    # resumes.
    self._position = None
    # Shared with the watchdog thread, under _lock: the workers seen so far (grain forgets a
    # dead one), whether the next batch is the first of this pipeline, the stall it ended.
    self._lock = threading.Lock()
    self._known: dict[int, BaseProcess] = {}
    self._first_batch = True
    self._stall: str | None = None
    self._waiting_since: float | None = None
    self._stop_watch = threading.Event()
    self._watchdog: threading.Thread | None = None

  def __next__(self):
    self._assert_not_closed()
    self._start_watchdog()
    while True:
      self._waiting_since = time.monotonic()
      try:
        batch = next(self._parent)
      except Exception as error:  # re-raised as it is unless a worker died or stalled
        failure = self._failure()
        if failure is None:
          raise
        self._restart_or_raise(failure, error)
        continue
      finally:
        self._waiting_since = None
      self._batches += 1
      self._position = self._parent.get_state()
      with self._lock:
        self._first_batch = False
        self._remember_workers()
      return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state) -> None:
    self._parent.set_state(state)
    self._position = state
    with self._lock:
      self._first_batch = True

  def close(self) -> None:
    if self._closed:
      return
    self._stop_watch.set()
    super().close()

  def __str__(self):
    return f"SupervisedWorkerIterator({self._num_workers} workers, {self._description})"

  def _remember_workers(self) -> None:
    for process in worker_processes(self._parent):
      self._known[process.pid] = process

  def _failure(self) -> str | None:
    """What happened to the workers, or None when they are all fine."""
    with self._lock:
      self._remember_workers()
      if self._stall is not None:
        return self._stall
      dead = sorted((pid, p.exitcode) for pid, p in self._known.items()
                    if p.exitcode not in (None, 0))
    if not dead:
      return None
    return "; ".join(f"worker pid {pid} {describe_exit(code)}" for pid, code in dead)

  def _restart_or_raise(self, failure: str, error: Exception) -> None:
    if self.restarts >= self._max_restarts:
      restarted = f", after {self.restarts} restart(s)" if self.restarts else ""
      raise DataError(
          f"data pipeline ({self._description}; {self._num_workers} grain worker processes): "
          f"{failure}, at batch {self._batches + 1} of this launch{restarted}; no restart left "
          f"(data.worker_restarts={self._max_restarts}). Rerun the same command: the run "
          "resumes from its last checkpoint at the exact data position") from error
    self.restarts += 1
    logging.warning("data pipeline: %s, at batch %d of this launch; restarting the %d worker "
                    "processes at that position (restart %d of data.worker_restarts=%d)", failure,
                    self._batches + 1, self._num_workers, self.restarts, self._max_restarts)
    self._parent.close()  # frees the survivors' memory before new workers start
    fresh = self._dataset.__iter__()
    if self._position is not None:
      fresh.set_state(self._position)
    with self._lock:
      self._parents = (fresh,)
      self._known, self._stall, self._first_batch = {}, None, True
      self._waiting_since = None  # the wait for the new workers starts now

  def _start_watchdog(self) -> None:
    if self._watchdog is None:
      self._watchdog = threading.Thread(target=_watch, args=(weakref.ref(self), self._stop_watch),
                                        name="data-worker-watchdog", daemon=True)
      self._watchdog.start()

  def _check_stall(self) -> None:
    """Watchdog step: remembers the workers; stops them when the consumer waited too long."""
    with self._lock:
      self._remember_workers()
      since = self._waiting_since
      if self._timeout_s <= 0 or since is None or self._stall is not None:
        return
      limit = self._timeout_s + (WORKER_START_S if self._first_batch else 0.0)
      waited = time.monotonic() - since
      if waited <= limit:
        return
      stuck = sorted(pid for pid, p in self._known.items() if p.exitcode is None)
      for pid in stuck:
        self._known[pid].kill()
      which = "first batch, " if self._first_batch else ""
      self._stall = (f"no batch from the worker processes for {waited:.0f} s ({which}limit "
                     f"{limit:g} s from data.worker_timeout_s={self._timeout_s:g}); stopped the "
                     f"stuck workers (pids {', '.join(map(str, stuck)) or 'none alive'})")
    logging.warning("data pipeline: %s", self._stall)


def _watch(ref: weakref.ref, stop: threading.Event) -> None:
  """The watchdog thread's loop; holds the iterator only weakly so it can be collected."""
  while not stop.wait(WATCH_POLL_S):
    iterator = ref()
    if iterator is None:
      return
    iterator._check_stall()  # pylint: disable=protected-access
    del iterator
