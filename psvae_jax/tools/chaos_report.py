"""The chaos soak's figures and its one table (Markdown).

Columns: processes; faults delivered; SIGKILL and SIGTERM faults, each with its split over
the moments data/step/save/between; restarts (launches after the first); steps recomputed (the
work lost to the faults: for each restart, the steps the previous launch had completed beyond
the checkpoint the restart resumed from); problems (launches that hung, failed or resumed
wrongly); the soak's wall time, the uninterrupted run's, and the overhead between them;
whether the final params, EMA, optimizer state and data position are identical bit for bit.
"""
from __future__ import annotations

import dataclasses

from psvae_jax.fault_points import MOMENTS, SIGNALS
from psvae_jax.tools.chaos_compare import CATEGORIES, Difference
from psvae_jax.tools.chaos_outcome import LaunchRecord


def steps_recomputed(records: list[LaunchRecord]) -> int:
  """Steps completed by a launch and computed again by the next one (lost to its fault)."""
  return sum(max(0, before.reached - after.start_step)
             for before, after in zip(records, records[1:]))


@dataclasses.dataclass
class Summary:
  """The soak in figures; `differences` is None when the final states were not compared."""
  processes: int
  by_signal: dict[str, dict[str, int]]  # signal -> moment -> delivered faults
  restarts: int
  recomputed: int
  problems: list[str]
  soak_s: float
  uninterrupted_s: float | None
  differences: list[Difference] | None

  @property
  def faults(self) -> int:
    return sum(sum(m.values()) for m in self.by_signal.values())

  @property
  def identical(self) -> bool:
    return self.differences is not None and not self.differences

  @property
  def ok(self) -> bool:
    return self.identical and not self.problems


def summarize(records: list[LaunchRecord], *, processes: int, problems: list[str],
              uninterrupted_s: float | None,
              differences: list[Difference] | None) -> Summary:
  by_signal = {s: {m: 0 for m in MOMENTS} for s in SIGNALS}
  for record in records:
    fault = record.launch.fault
    if fault is not None and record.launch.delivered_s is not None:
      by_signal[fault.signal][fault.moment] += 1
  return Summary(processes=processes, by_signal=by_signal, restarts=max(len(records) - 1, 0),
                 recomputed=steps_recomputed(records), problems=problems,
                 soak_s=sum(r.launch.wall_s for r in records), uninterrupted_s=uninterrupted_s,
                 differences=differences)


def table(summary: Summary) -> str:
  """The one-row Markdown table, then one line per problem and per differing part."""
  split = "/".join(MOMENTS)
  header = ["processes", "faults", *(f"{s} ({split})" for s in SIGNALS), "restarts",
            "steps recomputed", "problems", "soak s", "uninterrupted s", "overhead",
            "final state identical"]
  by_signal = [f"{sum(m.values())} ({'/'.join(str(m[k]) for k in MOMENTS)})"
               for m in summary.by_signal.values()]
  base = summary.uninterrupted_s
  overhead = f"{100 * (summary.soak_s / base - 1):+.0f}%" if base else "n/a"
  identical = ("yes" if summary.identical else
               "no" if summary.differences is not None else "not compared")
  row = [str(summary.processes), str(summary.faults), *by_signal, str(summary.restarts),
         str(summary.recomputed), str(len(summary.problems)), f"{summary.soak_s:.0f}",
         f"{base:.0f}" if base else "n/a", overhead, identical]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
           "| " + " | ".join(row) + " |"]
  lines += [f"problem: {p}" for p in summary.problems]
  if summary.differences:
    for name in CATEGORIES:
      diffs = [d for d in summary.differences if d.category == name]
      if diffs:
        shown = "; ".join(f"{d.key}: {d.what}" for d in diffs[:3])
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        lines.append(f"differs: {name}: {len(diffs)} entries: {shown}{more}")
  return "\n".join(lines)
