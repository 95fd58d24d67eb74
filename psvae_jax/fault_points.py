"""Named moments of the training loop where a planned fault can strike (`tools.chaos`).

The loop calls `reached(moment, step)` at each moment of each step. Unless the environment
variable PSVAE_FAULT_PLAN names a plan, '<moment>:<step>:<SIGKILL|SIGTERM>', that call does
nothing. With a plan, the process sends that signal to the launched process when it reaches that
moment of that step (loop step index, 0-based), after writing one line to the file
PSVAE_FAULT_MARKER names (when set) so that whoever planned it knows the fault was delivered.
The launched process is this one, or, in a multi-process run, the supervising parent of this
worker (`peer_supervisor`): as a scheduler or a dying host would, the fault strikes what was
launched; the parent forwards SIGTERM to the worker, and a SIGKILL ends both at once.

Moments: 'data' (the step's batch is about to be taken from the data iterator, whose readers
are running), 'step' (the step's computation dispatched, still running), 'save' (a checkpoint
save of this step's result started, its asynchronous write in flight), 'between' (the step's
update finished and saved if due, the next step not begun).
"""
from __future__ import annotations

import os
import signal
import time

from psvae_jax import peer_supervisor

PLAN_ENV = "PSVAE_FAULT_PLAN"
MARKER_ENV = "PSVAE_FAULT_MARKER"
MOMENTS = ("data", "step", "save", "between")
SIGNALS = ("SIGKILL", "SIGTERM")


def parse_plan(text: str) -> tuple[str, int, str] | None:
  """'<moment>:<step>:<signal>' -> (moment, step, signal); '' -> None. ValueError if malformed."""
  if not text:
    return None
  moment, step, name = text.split(":")
  if moment not in MOMENTS or name not in SIGNALS or int(step) < 0:
    raise ValueError(f"{PLAN_ENV}={text!r}: expected <moment>:<step>:<signal> with moment in "
                     f"{MOMENTS}, signal in {SIGNALS}")
  return moment, int(step), name


_PLAN = parse_plan(os.environ.get(PLAN_ENV, ""))


def reached(moment: str, step: int, wait=None) -> None:
  """Delivers the planned fault if this is its moment and step. `wait`: arrays to finish
  computing first (only then, so that an unplanned run never blocks here)."""
  if _PLAN is None or _PLAN[0] != moment or _PLAN[1] != step:
    return
  if wait is not None:
    import jax
    jax.block_until_ready(wait)
  marker = os.environ.get(MARKER_ENV)
  if marker:
    with open(marker, "w") as f:
      f.write(f"{moment} {step} {_PLAN[2]} pid={os.getpid()} at={time.time():.3f}\n")
  signum = getattr(signal, _PLAN[2])
  launched = peer_supervisor.launched_pid()
  os.kill(launched, signum)
  if signum == signal.SIGKILL and launched != os.getpid():
    os.kill(os.getpid(), signum)  # now, not when the parent's death reaches this worker
