"""Chaos soak: a training job killed and preempted again and again must end bit-identical to
the same job run without interruption.

  python -m psvae_jax.tools.chaos --config=configs/svae.py:smoke --workdir=/tmp/chaos \\
      --faults=10 [--processes=2] [--seed=0] [--config.key=value ...]

The soak runs `python -m psvae_jax.main` (with --processes=N, N processes on 127.0.0.1 and
--peer_timeout_s=--peer_timeout) in WORKDIR/soak. From --seed it draws --faults faults
(`chaos_plan`): each a signal, SIGKILL or SIGTERM, to one process at one moment of one step:
'data' (the step's batch being taken from the data iterator), 'step' (the step's computation
dispatched and running), 'save' (a checkpoint's asynchronous write in flight) or 'between'
(between two steps). The process reaches that moment through `psvae_jax.fault_points` and
signals the launched process (itself, or with several processes the supervisor main forked it
from). After each fault the soak waits for every process (once one has ended, the others get
2 x --peer_timeout + 30 s; each launch --launch_timeout), then relaunches the job, until every
fault was delivered and the job reached total_steps. It then runs the same job once more, without
faults, in WORKDIR/uninterrupted, and compares the two final checkpoints bit for bit: every
array of the train state (params, optimizer state, the rest) and of the EMA, and the stored
data-iterator position.

Expected of each launch (`chaos_outcome`): every process starts at the newest complete
checkpoint. SIGKILL ends the struck process; with several processes each survivor exits 75 with
main's line `error: lost contact with process N`. SIGTERM takes the preemption path: every
process checkpoints one step and exits 143; one process saves the step after the fault, several
save the step they agreed on (named by each, at least the step after the fault, holding every
process's data position). A process that trains on more than --term_grace_steps steps past the
step after its SIGTERM is killed, as a preempted host would be, and reported.
`--config.key=value` flags go to the job; the soak adds --config.log_every=1 (steps lost are
counted from metrics.jsonl) and --config.checkpoint_every=--checkpoint_every before them. A
one-process job gets a persistent compilation cache (WORKDIR/xla_cache/<run>) so relaunches
skip most compiles. With several processes there is none: jax writes the cache from process 0
only and, on CPU, process 1's cache keys differ from process 0's, so process 1 would compile
every launch while process 0 loads the step and waits for it in the first collective.

The table (one row; also in WORKDIR/chaos_report.json with one line per launch):
  faults            faults delivered; SIGKILL / SIGTERM: how many of each, split over the
                    moments data/step/save/between
  restarts          launches after the first
  steps recomputed  steps a launch completed beyond the checkpoint the next one resumed from
  problems          launches that hung (killed at a timeout), ended otherwise than expected,
                    or resumed elsewhere than the newest checkpoint; listed under the table
  soak s, uninterrupted s, overhead   wall times of the two runs; the soak's extra time
  final state identical   yes when every array and the data position match bit for bit;
                    otherwise the differing parts are listed under the table
Exit status 0 only when the final state is identical and no launch had a problem; 1
otherwise; 2 for a usage error (an unusable config, too few steps for the faults, a workdir
that already holds a soak).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from psvae_jax import errors
from psvae_jax.tools import chaos_compare, chaos_launch, chaos_outcome, chaos_plan, chaos_report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = ("soak", "uninterrupted")
SURVIVOR_MARGIN_S = 30.0


@dataclasses.dataclass
class Settings:
  """Everything a soak needs besides the job's own flags."""
  faults: int
  processes: int = 1
  seed: int = 0
  checkpoint_every: int = 4  # 0 = the config's
  launch_timeout: float = 1800.0
  peer_timeout: int = 5  # several processes: the job's --peer_timeout_s
  term_grace_steps: int = 4
  compilation_cache: bool = True

  @property
  def survivor_bound_s(self) -> float:
    """Seconds the other processes get to end once one has ended: the heartbeat timeout twice
    (the runtime notices a lost peer within it) and a margin for a loaded machine."""
    return 2 * self.peer_timeout + SURVIVOR_MARGIN_S


def job_overrides(settings: Settings, user_overrides: list[str]) -> list[str]:
  """The soak's --config overrides, then the user's (a later flag wins)."""
  ours = ["--config.log_every=1"]
  if settings.checkpoint_every:
    ours.append(f"--config.checkpoint_every={settings.checkpoint_every}")
  return ours + list(user_overrides)


def job_config(config: str, overrides: list[str]):
  """The config the job will run with: `config` and `overrides` parsed as main parses them."""
  argv = ["chaos", f"--config={config}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    values(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError) as e:
    raise errors.UserError(f"--config={config} {' '.join(overrides)}: "
                           f"{errors.message(e)}") from e
  return values.config


def _make_job(run: str, config: str, overrides: list[str], workdir: str,
              settings: Settings) -> chaos_launch.Job:
  cache = ""
  if settings.compilation_cache and settings.processes == 1:
    cache = os.path.join(workdir, "xla_cache", run)
  return chaos_launch.Job(config=config, overrides=overrides,
                          workdir=os.path.join(workdir, run), processes=settings.processes,
                          log_dir=os.path.join(workdir, "logs"), compilation_cache_dir=cache,
                          cwd=REPO_ROOT, peer_timeout_s=settings.peer_timeout)


def _launch(job, tag, settings, *, fault=None, fault_step=None, total_steps, log_every,
            say) -> chaos_outcome.LaunchRecord:
  start = max(chaos_launch.complete_steps(job.workdir), default=0)
  offset = chaos_launch.metrics_size(job.workdir)
  launch = chaos_launch.run(job, tag, fault=fault, fault_step=fault_step,
                            launch_timeout=settings.launch_timeout,
                            survivor_bound_s=settings.survivor_bound_s,
                            term_grace_steps=settings.term_grace_steps)
  end = max(chaos_launch.complete_steps(job.workdir), default=0)
  record = chaos_outcome.LaunchRecord(
      launch=launch, start_step=start, end_step=end,
      logged=chaos_launch.logged_steps(job.workdir, offset),
      positions=chaos_launch.data_positions(job.workdir, end))
  record.problems = chaos_outcome.check(record, total_steps=total_steps, log_every=log_every,
                                        survivor_bound_s=settings.survivor_bound_s)
  say(chaos_outcome.describe(record))
  for problem in record.problems:
    say(f"problem: {problem}")
  return record


def _run_plan(job, plan, settings, *, checkpoint_every, total_steps, **common):
  """Launches the job once per fault of `plan`, then once more without one; stops early
  when a fault does not strike. Returns the launch records and the problems met."""
  records: list[chaos_outcome.LaunchRecord] = []
  problems: list[str] = []
  pending = list(plan)
  while True:
    fault, step = None, None
    while pending and step is None:
      resumed_at = max(chaos_launch.complete_steps(job.workdir), default=0)
      fault = pending[0]
      step = chaos_plan.deliverable_step(fault, resumed_at, total_steps=total_steps,
                                         checkpoint_every=checkpoint_every)
      if step is None:
        problems.append(f"fault {fault.index} ({fault.describe()}) not delivered: the job "
                        f"resumed at step {resumed_at}, past every step it could strike")
        pending.pop(0)
        fault = None
    record = _launch(job, f"soak{len(records):02d}", settings, fault=fault, fault_step=step,
                     total_steps=total_steps, **common)
    records.append(record)
    problems += record.problems
    if fault is None or record.launch.delivered_s is None:
      return records, problems  # the last launch, or a fault that did not strike
    pending.pop(0)


def soak(config: str, user_overrides: list[str], workdir: str, settings: Settings,
         say=lambda line: print(line, file=sys.stderr, flush=True)) -> chaos_report.Summary:
  """Runs the soak and the uninterrupted job in `workdir`; returns the figures (and writes
  them to WORKDIR/chaos_report.json)."""
  if settings.processes < 1:
    raise errors.UserError(f"--processes={settings.processes} must be >= 1")
  if settings.processes > 1 and settings.peer_timeout < 1:
    raise errors.UserError(f"--peer_timeout={settings.peer_timeout} must be at least 1 second")
  for run in RUNS:
    path = os.path.join(workdir, run)
    if os.path.isdir(path) and os.listdir(path):
      raise errors.UserError(f"{path} already holds a run: give the soak an empty --workdir")
  overrides = job_overrides(settings, user_overrides)
  cfg = job_config(config, overrides)
  total, every = int(cfg.total_steps), int(cfg.checkpoint_every)
  plan = chaos_plan.draw_plan(settings.seed, settings.faults, total_steps=total,
                              checkpoint_every=every, processes=settings.processes)
  say(f"chaos: {config}, {settings.processes} process(es), seed {settings.seed}, "
      f"{total} steps, checkpoint every {every}; plan: "
      + "; ".join(f.describe() for f in plan))
  common = dict(total_steps=total, log_every=int(cfg.log_every), say=say)
  soak_job = _make_job("soak", config, overrides, workdir, settings)
  records, problems = _run_plan(soak_job, plan, settings, checkpoint_every=every, **common)
  differences, uninterrupted_s = None, None
  if records[-1].end_step == total:
    reference = _launch(_make_job("uninterrupted", config, overrides, workdir, settings),
                        "uninterrupted", settings, **common)
    problems += reference.problems
    uninterrupted_s = reference.launch.wall_s
    if reference.end_step == total:
      differences = chaos_compare.compare(
          chaos_compare.read_step(os.path.join(soak_job.workdir, "checkpoints"), total),
          chaos_compare.read_step(os.path.join(workdir, "uninterrupted", "checkpoints"), total))
  elif not problems:
    problems.append(f"the soak ended at checkpoint {records[-1].end_step}, not {total}")
  summary = chaos_report.summarize(records, processes=settings.processes, problems=problems,
                                   uninterrupted_s=uninterrupted_s, differences=differences)
  _write_report(workdir, config, overrides, settings, plan, records, summary)
  return summary


def _write_report(workdir, config, overrides, settings, plan, records, summary) -> None:
  report = {
      "config": config, "overrides": overrides, "settings": dataclasses.asdict(settings),
      "plan": [dataclasses.asdict(f) for f in plan],
      "launches": [chaos_outcome.describe(r) for r in records],
      "faults": summary.faults, "by_signal": summary.by_signal, "restarts": summary.restarts,
      "steps_recomputed": summary.recomputed, "problems": summary.problems,
      "soak_s": summary.soak_s, "uninterrupted_s": summary.uninterrupted_s,
      "identical": summary.identical,
      "differences": [dataclasses.asdict(d) for d in summary.differences or []],
  }
  with open(os.path.join(workdir, "chaos_report.json"), "w") as f:
    json.dump(report, f, indent=2)


# --- command line --------------------------------------------------------------------------

def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  f = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file("config", None, "Stage config file[:preset] of the job.",
                                  lock_config=True, **f)
  flags.DEFINE_string("workdir", None, "Directory of the soak (empty or new).", **f)
  flags.DEFINE_integer("faults", None, "Faults to deliver.", **f)
  flags.DEFINE_integer("processes", 1, "Processes of the job (on 127.0.0.1).", **f)
  flags.DEFINE_integer("seed", 0, "Seed of the fault plan.", **f)
  flags.DEFINE_integer("checkpoint_every", Settings.checkpoint_every,
                       "The job's config.checkpoint_every (0 = the config's).", **f)
  flags.DEFINE_float("launch_timeout", Settings.launch_timeout,
                     "Seconds a launch may run before it counts as hung and is killed.", **f)
  flags.DEFINE_integer("peer_timeout", Settings.peer_timeout,
                       "Several processes: the job's --peer_timeout_s (seconds without a "
                       "heartbeat before a process counts as lost). Once one process has ended, "
                       f"the others get twice that plus {SURVIVOR_MARGIN_S:g} s to end.", **f)
  flags.DEFINE_integer("term_grace_steps", Settings.term_grace_steps,
                       "Steps a job may train on past the step its SIGTERM should stop it at "
                       "before the signalled process is killed (and reported).", **f)
  flags.DEFINE_bool("compilation_cache", Settings.compilation_cache,
                    "Persistent compilation cache per run (one-process jobs only).", **f)
  flags.mark_flags_as_required(["config", "workdir", "faults"], **f)


def user_config_overrides(argv: list[str]) -> list[str]:
  """The --config.key=value flags of a command line, in order."""
  out = []
  for arg in argv:
    if arg.startswith("--config."):
      if "=" not in arg:
        raise app.UsageError(f"{arg}: write config overrides as --config.key=value")
      out.append(arg)
  return out


def _absolute_config(config: str) -> str:
  """configs/x.py[:preset] with the file made absolute (the job runs from the repository)."""
  path, sep, preset = config.partition(":")
  return os.path.abspath(path) + sep + preset if os.path.exists(path) else config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # The soak's own lines only: reading the final checkpoints logs Orbax INFO and warnings.
  absl_logging.set_verbosity(absl_logging.ERROR)
  v = flags.FLAGS
  settings = Settings(faults=v.faults, processes=v.processes, seed=v.seed,
                      checkpoint_every=v.checkpoint_every, launch_timeout=v.launch_timeout,
                      peer_timeout=v.peer_timeout, term_grace_steps=v.term_grace_steps,
                      compilation_cache=v.compilation_cache)
  config = _absolute_config(config_flags.get_config_filename(v["config"]))
  try:
    os.makedirs(v.workdir, exist_ok=True)
    summary = soak(config, user_config_overrides(sys.argv[1:]), os.path.abspath(v.workdir),
                   settings)
  except errors.UserError as e:
    errors.exit_with(e)
  print(chaos_report.table(summary), flush=True)
  sys.exit(0 if summary.ok else 1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
