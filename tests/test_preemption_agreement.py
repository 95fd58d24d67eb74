"""The stop-step agreement of several processes (preemption.PreemptionWatch), with the loops as
threads and an in-memory key-value store with the coordination service's semantics.

Whatever step each loop is at when the request arrives (one far ahead, one far behind, in
lockstep through a barrier like collectives, one already finished), every loop stops at the same
step and no loop passes it before it is known.
"""
import threading
import time

import jax
import pytest

from psvae_jax.preemption import PreemptionWatch


class Store:
  """The key-value calls of jax's DistributedRuntimeClient that the agreement makes."""

  def __init__(self):
    self._values: dict[str, str] = {}
    self._changed = threading.Condition()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self._changed:
      if key in self._values and not allow_overwrite:
        raise jax.errors.JaxRuntimeError(f"ALREADY_EXISTS: key {key} already exists.")
      self._values[key] = value
      self._changed.notify_all()

  def blocking_key_value_get(self, key, timeout_in_ms):
    with self._changed:
      if not self._changed.wait_for(lambda: key in self._values, timeout_in_ms / 1000):
        raise jax.errors.JaxRuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out: {key}")
      return self._values[key]

  def key_value_try_get(self, key):
    with self._changed:
      if key not in self._values:
        raise jax.errors.JaxRuntimeError(f"NOT_FOUND: Config key {key} not found.")
      return self._values[key]

  def key_value_dir_get(self, prefix):
    with self._changed:
      return [(k, v) for k, v in self._values.items() if k.startswith(prefix)]


def _run_loops(seconds_per_step, signal_at, end=2000, lockstep=False):
  """Runs one loop per entry of `seconds_per_step` (steps 1..end, each checks `should_stop`);
  `signal_at[i]` is the step after which loop i gets SIGTERM (None: never). Returns the last
  step each loop ran."""
  count = len(seconds_per_step)
  store = Store()
  barrier = threading.Barrier(count, timeout=30) if lockstep else None
  results = [None] * count
  errors = []

  def loop(index):
    try:
      watch = PreemptionWatch(store, process_index=index, process_count=count)
      watch.begin(0, end)
      last = None
      for done in range(1, end + 1):
        time.sleep(seconds_per_step[index])
        if barrier is not None:
          barrier.wait()  # a collective: no loop completes a step before all dispatched it
        last = done
        if done == signal_at[index]:
          watch.flag.set()
        if watch.should_stop(done):
          break
      watch.close()
      results[index] = last
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
      if barrier is not None:
        barrier.abort()

  threads = [threading.Thread(target=loop, args=(i,)) for i in range(count)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=120)
  assert not errors, errors
  assert all(r is not None for r in results), "a loop did not finish"
  return results


@pytest.mark.reliability(fault="SIGTERM to process(es) {signalled} of two loops far apart "
                         "(simulated)", expected="both stop at the same step, before the end")
@pytest.mark.parametrize("signalled", [0, 1, "both"])
def test_loops_far_apart_stop_at_one_step(signalled):
  # Loop 0 runs 5 times faster: when the request arrives it is far ahead of loop 1.
  signal_at = [None, None]
  for i in ((0, 1) if signalled == "both" else (signalled,)):
    signal_at[i] = 20
  results = _run_loops([0.002, 0.01], signal_at)
  assert results[0] == results[1] < 2000, results


@pytest.mark.reliability(fault="SIGTERM to one of three loops coupled step by step (simulated "
                         "collectives)", expected="all stop at one step, no deadlock")
def test_loops_in_lockstep_do_not_deadlock():
  results = _run_loops([0.001, 0.005, 0.0], [None, 10, None], lockstep=True)
  assert len(set(results)) == 1 and results[0] < 2000, results


@pytest.mark.reliability(fault="SIGTERM to a process after another finished its run "
                         "(simulated)", expected="both run to the last step, no wait")
def test_request_after_a_loop_finished_lets_the_others_finish():
  # Loop 0 ends its run (and proposes a step past its end) long before loop 1 is signalled.
  results = _run_loops([0.0, 0.01], [None, 30], end=60)
  assert results == [60, 60]
