"""SIGTERM (preemption, maintenance, a scheduler's time limit) -> a checkpoint -> exit 143.

One process: the handler sets a flag; the loop saves at the step it has reached and stops.

Several processes: all must save the same step, even when only one host got the signal (the
others would otherwise train on while the signalled one waits in the next collective, or stop at
another step and tear the checkpoint). They agree through the distributed runtime's key-value
store, the way JAX's preemption sync protocol does (its own SIGTERM handler is switched off in
`distributed.initialize`):
- a signalled process publishes a stop request;
- every process runs a listener thread that waits for the request and then proposes a stop
  step: the step after the last one its loop has checked (taken under a lock, so the loop cannot
  pass it unseen), published under its process index;
- the loop, on reaching its own proposal, waits until every process has proposed and stops at
  the largest proposal. No process can have passed that step, since each waits at its own.
The listeners answer while their loops are busy (or blocked in a collective that needs another
process's next step), so the wait cannot deadlock. A process that leaves the loop (its run ended,
or failed) proposes the step after its last, which no one reaches: the others then run to the end.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

import jax

from psvae_jax import distributed

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM stopped
_PREFIX = "psvae_jax/preemption"
REQUEST_KEY = f"{_PREFIX}/request"
PROPOSAL_DIR = f"{_PREFIX}/proposal/"
# The listener's wait on the request key returns at least this often to notice a local signal
# and the end of the run.
_LISTEN_MS = 1000
# How long the loop waits for the other processes' proposals before giving up; a lost process
# stops this one sooner (the runtime's heartbeat timeout), so only a live but unresponsive
# process can run into it, e.g. one still restoring a large checkpoint.
ANSWER_TIMEOUT_S = 600.0


class Preempted(SystemExit):
  """Raised after a SIGTERM-triggered checkpoint was written; exit code 143 (128 + SIGTERM)."""

  def __init__(self, step: int):
    super().__init__(EXIT_PREEMPTED)
    self.step = step


class PreemptionAgreementError(RuntimeError):
  """The processes could not agree on a stop step (one did not answer in time)."""


class PreemptionWatch:
  """SIGTERM -> flag; `should_stop(step)` says when the loop saves and stops (the same step on
  every process). Call `begin(start, end)` before the loop and `close()` after it."""

  def __init__(self, client=None, process_index: int | None = None,
               process_count: int | None = None):
    """Defaults: this process in the distributed runtime. `client` offers the key-value calls
    of jax's DistributedRuntimeClient that the agreement uses."""
    self.flag = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    self._index = jax.process_index() if process_index is None else process_index
    self._count = jax.process_count() if process_count is None else process_count
    self._client = None
    if self._count > 1:
      self._client = client or distributed.key_value_client()
    self._lock = threading.Lock()
    self._checked: int | None = None  # the last step the loop asked about
    self._proposal: int | None = None
    self._end: int | None = None
    self._requested = False
    self._stop_step: int | None = None
    self._closing = threading.Event()
    self._listener: threading.Thread | None = None

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint%s, then exiting",
                    " at a step all processes agree on" if self._client else
                    " at the current step")
    self.flag.set()

  def begin(self, start: int, end: int) -> None:
    """The loop runs steps `start + 1 .. end`; several processes start listening for requests."""
    self._checked, self._end = start, end
    if self._client is not None:
      self._listener = threading.Thread(target=self._listen, daemon=True,
                                        name="preemption-listener")
      self._listener.start()

  def should_stop(self, step: int) -> bool:
    """Called once per step, after `step`: True when the run saves at `step` and stops."""
    if self._client is None:
      return self.flag.is_set()
    if self.flag.is_set():
      self._request()  # at once, rather than at the listener's next round
    with self._lock:
      self._checked = step
      reached_own = self._proposal is not None and step >= self._proposal
    if reached_own and self._stop_step is None:
      self._stop_step = self._agree()
    return self._stop_step == step

  def close(self) -> None:
    """After the loop: proposes a step past this process's last (unblocking any process that
    waits for its answer), stops the listener and puts the previous SIGTERM handler back."""
    if self._listener is not None:
      self._closing.set()
      self._listener.join()
      self._propose()
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  # --- several processes --------------------------------------------------------------------
  def _request(self) -> None:
    """Publishes this process's stop request, once."""
    with self._lock:
      if self._requested:
        return
      self._requested = True
    self._client.key_value_set(REQUEST_KEY, f"process {self._index}", allow_overwrite=True)

  def _listen(self) -> None:
    while not self._closing.is_set():
      try:
        if self.flag.is_set():
          self._request()
        self._client.blocking_key_value_get(REQUEST_KEY, _LISTEN_MS)
      except jax.errors.JaxRuntimeError as e:
        if "DEADLINE_EXCEEDED" in str(e):
          continue  # no request yet
        # The runtime is failing (a lost process); it stops this process by itself.
        logging.info("preemption listener stopped: %s", str(e).splitlines()[0])
        return
      self._propose(announce=True)
      return

  def _propose(self, announce: bool = False) -> None:
    """Publishes, once, the step after the last one the loop has checked."""
    with self._lock:
      if self._proposal is not None or self._checked is None:
        return
      self._proposal = self._checked + 1
    key = f"{PROPOSAL_DIR}{self._index}"
    try:
      self._client.key_value_set(key, str(self._proposal), allow_overwrite=True)
    except jax.errors.JaxRuntimeError as e:
      logging.info("could not publish the stop proposal: %s", str(e).splitlines()[0])
      return
    if announce:
      logging.info("stop requested (%s); this process proposes step %d",
                   self._request_source(), self._proposal)

  def _agree(self) -> int:
    """Waits for every process's proposal; the stop step is the largest."""
    count = self._count
    started = last_note = time.monotonic()
    while True:
      proposals = {int(key.rsplit("/", 1)[1]): int(value)
                   for key, value in self._client.key_value_dir_get(PROPOSAL_DIR)}
      if len(proposals) == count:
        break
      missing = sorted(set(range(count)) - set(proposals))
      now = time.monotonic()
      if now - started > ANSWER_TIMEOUT_S:
        raise PreemptionAgreementError(
            f"process(es) {missing} did not answer the stop request within "
            f"{ANSWER_TIMEOUT_S:.0f} s; no checkpoint was written for it")
      if now - last_note > 30:
        logging.warning("waiting for process(es) %s to answer the stop request", missing)
        last_note = now
      time.sleep(0.05)
    stop = max(proposals.values())
    if stop > self._end:
      logging.warning("stop requested (%s), but a process has already finished the run: "
                      "running to step %d", self._request_source(), self._end)
    else:
      logging.warning("stop requested (%s): all %d processes save at step %d and exit",
                      self._request_source(), count, stop)
    return stop

  def _request_source(self) -> str:
    return "SIGTERM to " + self._client.key_value_try_get(REQUEST_KEY)
