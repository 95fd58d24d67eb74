"""What a launch of the chaos soak should have done, and the problems when it did otherwise.

Expected: SIGKILL ends the process it struck (status -9) and the other processes end by
themselves within the peer timeout; SIGTERM makes every process checkpoint one common step
after the fault's and exit with 143 (the preemption path); a launch without a fault runs to
total_steps and exits 0 everywhere; a relaunch resumes at the newest complete checkpoint.
"""
from __future__ import annotations

import dataclasses

from psvae_jax.tools.chaos_launch import Launch

SIGTERM_EXIT = 143
SIGKILL_STATUS = -9


@dataclasses.dataclass
class LaunchRecord:
  """A launch with the job's progress around it: the newest complete checkpoint before and
  after, and the steps it logged."""
  launch: Launch
  start_step: int
  end_step: int
  logged: list[int]
  problems: list[str] = dataclasses.field(default_factory=list)

  @property
  def reached(self) -> int:
    """The furthest step this launch is known to have completed."""
    return max([self.start_step, *self.logged])


def status(returncode: int | None) -> str:
  if returncode is None:
    return "killed by the soak"
  return f"signal {-returncode}" if returncode < 0 else f"exit {returncode}"


def describe(record: LaunchRecord) -> str:
  """One line: the fault, how each process ended and when, resume and end steps."""
  launch = record.launch
  what = launch.fault.describe(launch.fault_step) if launch.fault else "no fault"
  if launch.fault and launch.delivered_s is None:
    what += " (not delivered)"
  ends = ", ".join(f"process {e.process} {status(e.returncode)} at {e.seconds:.1f} s"
                   for e in launch.ends)
  when = f"; fault at {launch.delivered_s:.1f} s" if launch.delivered_s is not None else ""
  return (f"{launch.tag}: {what}; resumed at step {record.start_step}, reached "
          f"{record.reached}, checkpoint {record.end_step}{when}; {ends}")


def check(record: LaunchRecord, *, total_steps: int, log_every: int,
          peer_timeout: float) -> list[str]:
  """The problems of one launch (empty when it did what it should)."""
  launch = record.launch
  problems = []
  if launch.timed_out:
    problems.append(f"{launch.tag}: still running at the launch timeout (hang); killed")
  if log_every == 1 and record.logged and record.logged[0] != record.start_step + 1:
    problems.append(f"{launch.tag}: resumed at step {record.logged[0] - 1}, not at the newest "
                    f"complete checkpoint {record.start_step}")
  fault = launch.fault
  if fault is None:
    problems += [f"{launch.tag}: process {e.process} ended with {status(e.returncode)} "
                 f"({e.last_lines()})" for e in launch.ends if e.returncode != 0]
    if record.end_step != total_steps:
      problems.append(f"{launch.tag}: ended with checkpoint {record.end_step}, not "
                      f"{total_steps}")
    return problems
  if launch.delivered_s is None:
    ends = "; ".join(f"process {e.process} {status(e.returncode)} ({e.last_lines()})"
                     for e in launch.ends)
    return problems + [f"{launch.tag}: {fault.describe(launch.fault_step)} was not delivered; "
                       f"{ends}"]
  target = launch.ends[fault.process]
  expected = SIGKILL_STATUS if fault.signal == "SIGKILL" else SIGTERM_EXIT
  if launch.ignored_sigterm_at is not None:
    problems.append(f"{launch.tag}: process {target.process} went on training after SIGTERM "
                    f"at step {launch.fault_step} (step {launch.ignored_sigterm_at} logged); "
                    "killed")
  # Once the soak killed a process that ignored its SIGTERM, the others face a lost peer.
  all_stop = fault.signal == "SIGTERM" and launch.ignored_sigterm_at is None
  how = fault.signal if all_stop or fault.signal == "SIGKILL" else "killed by the soak"
  for end in launch.ends:
    if end is target and launch.ignored_sigterm_at is not None:
      continue
    if end is not target and end.returncode is None:
      problems.append(f"{launch.tag}: process {end.process} still running {peer_timeout:g} s "
                      f"after process {target.process} ended ({how}); killed")
    elif (end is target or all_stop) and end.returncode != expected:
      problems.append(f"{launch.tag}: process {end.process} ended with "
                      f"{status(end.returncode)} after {fault.signal} to process "
                      f"{target.process}, expected {status(expected)} ({end.last_lines()})")
  if all_stop:
    wanted = launch.fault_step + 1
    single = len(launch.ends) == 1
    if record.end_step < wanted or (single and record.end_step != wanted):
      problems.append(f"{launch.tag}: after SIGTERM at step {launch.fault_step} the newest "
                      f"checkpoint is {record.end_step}, expected "
                      f"{wanted if single else f'>= {wanted}'}")
  return problems
