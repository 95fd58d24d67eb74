"""grain worker processes under faults: one killed mid-epoch (what the OOM killer does), one that
stops delivering, and the training process itself killed while its workers run."""
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.batches import assert_same_batch
from helpers.processes import ended, grain_worker_pids
from psvae_jax.data import DataError, make_train_iterator
from psvae_jax.data.workers import worker_processes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = {"image_size": 32, "synthetic_size": 40, "eval_size": 16, "prefetch": 1,
       "read_threads": 2, "num_workers": 2}
N = 12
# Detection takes about a second; a restart spawns new workers (imports: seconds on a busy
# machine). Far below this bound, far above a healthy batch.
BOUND_S = 60.0


def _iterator(**cfg):
  return make_train_iterator({**CFG, **cfg}, global_batch_size=8, seed=0, process_index=0,
                             process_count=1)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _worker_pids(it) -> list[int]:
  """The iterator's workers, as /proc shows them and as the supervision finds them."""
  pids = grain_worker_pids(os.getpid())
  assert len(pids) == CFG["num_workers"]
  assert sorted(p.pid for p in worker_processes(it)) == pids
  return pids


@pytest.fixture(scope="module")
def reference():
  """N + 4 batches of an iterator whose workers are left alone."""
  it = _iterator()
  batches = _take(it, N + 4)
  it.close()
  return batches


@pytest.mark.reliability(
    fault="SIGKILL of a grain worker process mid-epoch (the OOM killer), twice",
    expected="1st: workers restarted at the exact position (same batches); 2nd, with "
             "data.worker_restarts=1: a one-line DataError naming the worker within seconds; "
             "the state saved before it resumes to the same batches")
def test_killed_worker_restarts_in_place_then_reports(reference):
  it = _iterator(worker_restarts=1)
  got = _take(it, 3)
  os.kill(_worker_pids(it)[0], signal.SIGKILL)
  start = time.monotonic()
  got += _take(it, N - 3)
  assert time.monotonic() - start < BOUND_S
  assert it.worker_restarts == 1
  for x, y in zip(reference, got):
    assert_same_batch(x, y)

  state = it.get_state()
  victim = _worker_pids(it)[1]
  os.kill(victim, signal.SIGKILL)
  start = time.monotonic()
  with pytest.raises(DataError) as caught:
    _take(it, N)  # the batches it made before it died come first
  elapsed = time.monotonic() - start
  it.close()
  message = str(caught.value)
  assert elapsed < BOUND_S, elapsed
  assert "\n" not in message
  for part in ("data pipeline", f"worker pid {victim} was killed by SIGKILL",
               "data.worker_restarts=1", "resumes from its last checkpoint"):
    assert part in message, message

  resumed = _iterator(worker_restarts=1)
  resumed.set_state(state)
  for x, y in zip(reference[N:], _take(resumed, 4)):
    assert_same_batch(x, y)
  resumed.close()


@pytest.mark.reliability(
    fault="a grain worker process stops delivering (SIGSTOP)",
    expected="time away from next() never counts; after data.worker_timeout_s of waiting the "
             "workers are stopped and a one-line DataError names the timeout")
def test_stuck_worker_times_out_but_a_busy_consumer_does_not(reference):
  timeout = 3.0  # the first batch (worker start-up) gets WORKER_START_S more
  it = _iterator(worker_timeout_s=timeout, worker_restarts=0)
  got = _take(it, 2)
  time.sleep(2 * timeout)  # the training loop elsewhere (compiling, saving): not a stall
  got += _take(it, 2)
  for x, y in zip(reference, got):
    assert_same_batch(x, y)
  stuck = _worker_pids(it)[0]
  os.kill(stuck, signal.SIGSTOP)
  try:
    start = time.monotonic()
    with pytest.raises(DataError) as caught:
      _take(it, N)
    elapsed = time.monotonic() - start
  finally:
    if not ended(stuck):
      os.kill(stuck, signal.SIGKILL)
    it.close()
  message = str(caught.value)
  assert timeout < elapsed < timeout + BOUND_S, elapsed
  for part in ("data pipeline", "no batch from the worker processes",
               "data.worker_timeout_s=3", f"stopped the stuck workers (pids {stuck}"):
    assert part in message, message


_TRAINING_PROCESS = """
import sys, time
from psvae_jax.data import make_train_iterator
it = make_train_iterator({cfg!r}, global_batch_size=8, seed=0, process_index=0, process_count=1)
next(it)
open(sys.argv[1], "w").close()
time.sleep(600)
"""


@pytest.mark.reliability(fault="SIGKILL of the training process while its grain workers run",
                         expected="the workers exit within seconds (no orphans holding memory)")
def test_workers_end_with_the_training_process(tmp_path):
  ready = tmp_path / "ready"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", _TRAINING_PROCESS.format(cfg=CFG), str(ready)],
                          cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  pids = []
  try:
    deadline = time.monotonic() + 300
    while not ready.exists():
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      assert time.monotonic() < deadline, "no batch in time"
      time.sleep(0.2)
    pids = grain_worker_pids(proc.pid)
    assert len(pids) == CFG["num_workers"]
  finally:
    proc.kill()
    proc.wait()
  start = time.monotonic()
  while not all(ended(pid) for pid in pids):
    if time.monotonic() - start > 15:
      for pid in pids:
        if not ended(pid):
          os.kill(pid, signal.SIGKILL)
      pytest.fail(f"grain workers {pids} outlived the killed training process by 15 s")
    time.sleep(0.1)
