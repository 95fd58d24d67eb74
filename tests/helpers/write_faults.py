"""Write errors injected where Orbax writes arrays (through TensorStore, out of reach of a Python
`open`): an array type handler whose writes of chosen steps fail with an OSError.

'commit' faults fail while the save is committed in Orbax's background thread, after the real
array data was written, as a disk that fills up or an I/O error would; 'start' faults fail as
the write starts (in the caller's thread), as a directory whose write permission was lost would.
A 'hold' keeps a step's commit waiting until released, to look at the directory meanwhile.
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading

import jax
import orbax.checkpoint as ocp

from psvae_jax import checkpoint as ckpt_lib

_STEP_IN_PATH = re.compile(r"/(\d+)\.orbax-checkpoint-tmp")
PHASES = ("commit", "start")


@dataclasses.dataclass
class _Fault:
  code: int  # errno
  phase: str


class _CommitFuture:
  """An Orbax commit future that waits for `hold` (if any), then raises `error` (if any)."""

  def __init__(self, error: OSError | None, hold: threading.Event | None):
    self.error, self.hold = error, hold

  def result(self, timeout=None):
    if self.hold is not None and not self.hold.wait(timeout if timeout is not None else 60):
      raise TimeoutError("held commit was never released")
    if self.error is not None:
      raise self.error


class WriteFaults:
  """The plan of injected faults, by step; `install()` puts the faulty handler in Orbax's type
  handler registry and `uninstall()` restores the one there before."""

  def __init__(self):
    self.faults: dict[int, _Fault] = {}
    self.holds: dict[int, threading.Event] = {}
    self.injected: list[tuple[int, int, str]] = []  # (step, errno, path) of each raised fault
    self._previous = None

  def fail(self, step: int, code: int, phase: str = "commit") -> None:
    """The save of `step` fails with OSError(code) in `phase` ('commit' or 'start')."""
    assert phase in PHASES, phase
    self.faults[step] = _Fault(code, phase)

  def hold(self, step: int) -> threading.Event:
    """The commit of `step` waits until the returned event is set."""
    self.holds[step] = threading.Event()
    return self.holds[step]

  def error_for(self, step: int | None, phase: str, path: str) -> OSError | None:
    fault = self.faults.get(step)
    if fault is None or fault.phase != phase:
      return None
    self.injected.append((step, fault.code, path))
    return OSError(fault.code, os.strerror(fault.code), path)

  def install(self) -> None:
    ckpt_lib._configure_orbax()  # the project's handler first, so that ours stays
    self._previous = ocp.type_handlers.get_type_handler(jax.Array)
    ocp.type_handlers.register_type_handler(jax.Array, _FaultyArrayHandler(self), override=True)

  def uninstall(self) -> None:
    ocp.type_handlers.register_type_handler(jax.Array, self._previous, override=True)


class _FaultyArrayHandler(ocp.type_handlers.ArrayHandler):
  """The CPU array handler of the project (one replica writes) with the plan's faults."""

  def __init__(self, faults: WriteFaults):
    super().__init__(use_replica_parallel=False)
    self._faults = faults

  async def serialize(self, values, infos, args=None):
    path = str(infos[0].parent_dir)
    found = _STEP_IN_PATH.search(path)
    step = int(found.group(1)) if found else None
    error = self._faults.error_for(step, "start", path)
    if error is not None:
      raise error
    commits = list(await super().serialize(values, infos, args))
    error = self._faults.error_for(step, "commit", path)
    hold = self._faults.holds.get(step)
    if error is not None or hold is not None:
      commits.append(_CommitFuture(error, hold))
    return commits
