"""The faults of a chaos soak, drawn from a seed: which step, moment, signal and process.

Faults lie at strictly increasing loop steps, at least two apart, one in each of `faults`
equal stretches of steps 1 .. total_steps-2, so they spread over the whole run and every
launch computes at least one new step before its fault strikes. A 'save' fault lies on a step
whose result is checkpointed ((step + 1) % checkpoint_every == 0).
"""
from __future__ import annotations

import dataclasses
import random

from psvae_jax.errors import UserError
from psvae_jax.fault_points import MOMENTS, SIGNALS


@dataclasses.dataclass(frozen=True)
class Fault:
  """One planned fault: `signal` to `process` at `moment` of loop step `step` (0-based)."""
  index: int
  moment: str
  step: int
  signal: str
  process: int

  def describe(self, step: int | None = None) -> str:
    return (f"{self.signal} to process {self.process} at {self.moment} of step "
            f"{self.step if step is None else step}")


def _valid(moment: str, step: int, checkpoint_every: int, total_steps: int) -> bool:
  if not 1 <= step <= total_steps - 2:
    return False
  return moment != "save" or (checkpoint_every > 0 and (step + 1) % checkpoint_every == 0)


def check_room(faults: int, total_steps: int) -> None:
  """Raises UserError when `faults` faults two steps apart do not fit in `total_steps`."""
  if faults < 0:
    raise UserError(f"--faults={faults} must be >= 0")
  if faults and total_steps < 2 * faults + 2:
    raise UserError(f"--faults={faults} needs config.total_steps >= {2 * faults + 2} (faults "
                    f"two steps apart, none on the last step); got {total_steps}: raise "
                    "--config.total_steps or lower --faults")


def draw_plan(seed: int, faults: int, *, total_steps: int, checkpoint_every: int,
              processes: int) -> list[Fault]:
  """`faults` faults drawn from `seed` (the same arguments give the same plan)."""
  check_room(faults, total_steps)
  rng = random.Random(seed)
  span = total_steps - 2  # steps 1 .. total_steps-2
  plan: list[Fault] = []
  previous = -1
  for i in range(faults):
    low = max(1 + i * span // faults, previous + 2)
    high = 1 + (i + 1) * span // faults  # exclusive
    moments = list(MOMENTS)
    rng.shuffle(moments)
    for moment in moments:  # the first drawn moment with a step in this stretch
      steps = [s for s in range(low, high) if _valid(moment, s, checkpoint_every, total_steps)]
      if steps:
        break
    step = rng.choice(steps)
    plan.append(Fault(index=i, moment=moment, step=step, signal=rng.choice(SIGNALS),
                      process=rng.randrange(processes)))
    previous = step
  return plan


def deliverable_step(fault: Fault, resumed_at: int, *, total_steps: int,
                     checkpoint_every: int) -> int | None:
  """The step at which `fault` strikes in a launch that resumes at loop step `resumed_at`: its
  planned step, or, when the job resumed past it (processes that agreed on a later preemption
  step), the first later step valid for its moment that leaves one new step before it; None
  when no such step remains."""
  if fault.step > resumed_at:
    return fault.step
  for step in range(resumed_at + 1, total_steps - 1):
    if _valid(fault.moment, step, checkpoint_every, total_steps):
      return step
  return None
