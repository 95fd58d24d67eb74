"""What a launch of the chaos soak should have done, and the problems when it did otherwise.

Expected of every launch: each process whose loop started, started at the newest complete
checkpoint (its log file's start line; with log_every=1 also the first step logged). Then:
- no fault: every process runs to total_steps and exits 0;
- SIGKILL to one process: it ends with that signal; with several processes every other one exits
  75 within the survivor bound, its console naming the lost process (`error: lost contact with
  process N`), as main does once the runtime notices the lost peer (--peer_timeout_s);
- SIGTERM to one process: every process saves one checkpoint and exits 143 (the preemption
  path). One process saves the step after the fault. Several save the step they agreed on: each
  names it on its console, the same step everywhere, at least the step after the fault; it is
  the newest complete checkpoint afterwards and holds every process's data position.
"""
from __future__ import annotations

import dataclasses
import re

from psvae_jax.peer_supervisor import EXIT_PEER_LOST
from psvae_jax.tools.chaos_launch import Launch, ProcessEnd

SIGTERM_EXIT = 143
SIGKILL_STATUS = -9
PEER_LOST_EXIT = EXIT_PEER_LOST
# preemption.PreemptionWatch's line once the processes agreed on a stop step.
_AGREED = re.compile(r"all \d+ processes save at step (\d+) and exit")


@dataclasses.dataclass
class LaunchRecord:
  """A launch with the job's progress around it: the newest complete checkpoint before and
  after, the steps it logged, and the data-position files of that newest checkpoint."""
  launch: Launch
  start_step: int
  end_step: int
  logged: list[int]
  positions: list[str] = dataclasses.field(default_factory=list)
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


def agreed_stop(end: ProcessEnd) -> int | None:
  """The stop step a process of a multi-process job said all processes agreed on (its last
  such line), None when it said none."""
  found = [m.group(1) for line in end.lines() for m in [_AGREED.search(line)] if m]
  return int(found[-1]) if found else None


def names_lost_peer(end: ProcessEnd, lost: int) -> bool:
  """Whether a survivor's console has main's one line naming process `lost` as lost."""
  pattern = re.compile(rf"^error: lost contact with process {lost}\b")
  return any(pattern.match(line) for line in end.lines())


def check(record: LaunchRecord, *, total_steps: int, log_every: int,
          survivor_bound_s: float) -> list[str]:
  """The problems of one launch (empty when it did what it should)."""
  launch = record.launch
  problems = []
  if launch.timed_out:
    problems.append(f"{launch.tag}: still running at the launch timeout (hang); killed")
  problems += _resume_problems(record, log_every)
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
  if launch.ignored_sigterm_at is not None:
    # The soak killed the process that trained on: the others face a lost peer.
    problems.append(f"{launch.tag}: process {fault.process} went on training after SIGTERM at "
                    f"step {launch.fault_step} (step {launch.ignored_sigterm_at} logged); killed")
    return problems + _survivor_problems(launch, "killed by the soak", survivor_bound_s)
  if fault.signal == "SIGKILL":
    target = launch.ends[fault.process]
    if target.returncode != SIGKILL_STATUS:
      problems.append(_unexpected_end(launch, target, SIGKILL_STATUS))
    return problems + _survivor_problems(launch, "SIGKILL", survivor_bound_s)
  return problems + _sigterm_problems(record, survivor_bound_s)


def _resume_problems(record: LaunchRecord, log_every: int) -> list[str]:
  tag, start = record.launch.tag, record.start_step
  out = []
  if log_every == 1 and record.logged and record.logged[0] != start + 1:
    out.append(f"{tag}: resumed at step {record.logged[0] - 1}, not at the newest complete "
               f"checkpoint {start}")
  for process, step in enumerate(record.launch.started):
    if step is not None and step != start:
      out.append(f"{tag}: process {process} started at step {step}, not at the newest "
                 f"complete checkpoint {start}")
  return out


def _unexpected_end(launch: Launch, end: ProcessEnd, expected: int) -> str:
  fault = launch.fault
  return (f"{launch.tag}: process {end.process} ended with {status(end.returncode)} after "
          f"{fault.signal} to process {fault.process}, expected {status(expected)} "
          f"({end.last_lines()})")


def _survivor_problems(launch: Launch, how: str, survivor_bound_s: float) -> list[str]:
  """The processes other than the struck one must notice the lost peer and exit 75 in time."""
  lost = launch.fault.process
  out = []
  for end in launch.ends:
    if end.process == lost:
      continue
    if end.returncode is None:
      out.append(f"{launch.tag}: process {end.process} still running {survivor_bound_s:g} s "
                 f"after process {lost} ended ({how}); killed")
    elif end.returncode != PEER_LOST_EXIT:
      out.append(f"{launch.tag}: process {end.process} ended with {status(end.returncode)} "
                 f"after process {lost} ended ({how}), expected exit {PEER_LOST_EXIT} "
                 f"({end.last_lines()})")
    elif not names_lost_peer(end, lost):
      out.append(f"{launch.tag}: process {end.process} exited {PEER_LOST_EXIT} without the "
                 f"line 'error: lost contact with process {lost}' ({end.last_lines()})")
  return out


def _sigterm_problems(record: LaunchRecord, survivor_bound_s: float) -> list[str]:
  launch = record.launch
  fault, tag = launch.fault, launch.tag
  out = []
  for end in launch.ends:
    if end.returncode is None:
      out.append(f"{tag}: process {end.process} still running {survivor_bound_s:g} s after "
                 f"another process ended (SIGTERM to process {fault.process}); killed")
    elif end.returncode != SIGTERM_EXIT:
      out.append(_unexpected_end(launch, end, SIGTERM_EXIT))
  wanted = launch.fault_step + 1
  if len(launch.ends) == 1:
    if record.end_step != wanted:
      out.append(f"{tag}: after SIGTERM at step {launch.fault_step} the newest checkpoint is "
                 f"{record.end_step}, expected {wanted}")
    return out
  agreed = {end.process: agreed_stop(end) for end in launch.ends}
  steps = set(agreed.values())
  if None in steps or len(steps) != 1:
    said = ", ".join(f"process {p}: {'none' if s is None else f'step {s}'}"
                     for p, s in agreed.items())
    return out + [f"{tag}: after SIGTERM at step {launch.fault_step} the processes did not "
                  f"name one agreed stop step ({said})"]
  stop = steps.pop()
  if stop < wanted:
    out.append(f"{tag}: the agreed stop step {stop} is before the step after the fault "
               f"({wanted})")
  if record.end_step != stop:
    out.append(f"{tag}: after SIGTERM at step {launch.fault_step} the newest checkpoint is "
               f"{record.end_step}, not the agreed stop step {stop}")
  count = len(launch.ends)
  missing = [p for p in range(count) if f"process_{p}-of-{count}.json" not in record.positions]
  if missing:
    out.append(f"{tag}: checkpoint {record.end_step} lacks the data position of process(es) "
               f"{missing} (it holds {record.positions})")
  return out
