"""psvae_jax.tools.chaos: the fault plan, the outcome checks, the table, the bit-for-bit
comparison, the loop's fault points, and (slow) whole soaks of a small S-VAE job.

The fast tests need no job: a plan is a pure function of the seed, the table is built from
launch records, the comparison is checked on a real toy checkpoint with one bit flipped. The
fault points are checked in-process on the toy task: SIGTERM at each moment ends the run
through the preemption path with a checkpoint at that step.
"""
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from psvae_jax import errors, fault_points
from psvae_jax import train as train_lib
from psvae_jax.tools import (chaos, chaos_compare, chaos_launch, chaos_outcome, chaos_plan,
                             chaos_report)
from psvae_jax.tools.chaos_launch import Launch, ProcessEnd

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SVAE_SMOKE = os.path.join(REPO_ROOT, "configs", "svae.py") + ":smoke"


# --- the plan ------------------------------------------------------------------------------

def _plan(seed, faults=10, total_steps=36, checkpoint_every=4, processes=1):
  return chaos_plan.draw_plan(seed, faults, total_steps=total_steps,
                              checkpoint_every=checkpoint_every, processes=processes)


def test_plan_is_reproducible_from_the_seed():
  assert _plan(3) == _plan(3)
  assert _plan(3) != _plan(4)
  assert _plan(3, processes=2) == _plan(3, processes=2)


@pytest.mark.parametrize("seed", range(12))
def test_plan_spreads_faults_two_steps_apart_and_saves_on_checkpoint_steps(seed):
  plan = _plan(seed, processes=2)
  assert len(plan) == 10
  steps = [f.step for f in plan]
  assert steps[0] >= 1 and steps[-1] <= 34
  assert all(b - a >= 2 for a, b in zip(steps, steps[1:])), steps
  for fault in plan:
    assert fault.moment in fault_points.MOMENTS and fault.signal in fault_points.SIGNALS
    assert fault.process in (0, 1)
    if fault.moment == "save":
      assert (fault.step + 1) % 4 == 0, fault


def test_plans_draw_every_moment_signal_and_process():
  faults = [f for seed in range(6) for f in _plan(seed, processes=2)]
  assert {f.moment for f in faults} == set(fault_points.MOMENTS)
  assert {f.signal for f in faults} == set(fault_points.SIGNALS)
  assert {f.process for f in faults} == {0, 1}


def test_plan_without_checkpoints_has_no_save_faults():
  assert all(f.moment != "save" for f in _plan(0, checkpoint_every=0))


def test_plan_refuses_too_few_steps():
  with pytest.raises(errors.UserError, match=r"--faults=10 needs config.total_steps >= 22"):
    _plan(0, total_steps=21)
  assert len(_plan(0, total_steps=22)) == 10


def test_deliverable_step_moves_past_a_later_resume():
  fault = chaos_plan.Fault(index=0, moment="save", step=7, signal="SIGTERM", process=1)
  kwargs = dict(total_steps=20, checkpoint_every=4)
  assert chaos_plan.deliverable_step(fault, 5, **kwargs) == 7
  assert chaos_plan.deliverable_step(fault, 8, **kwargs) == 11  # next checkpoint step
  assert chaos_plan.deliverable_step(fault, 16, **kwargs) is None
  data = dataclasses.replace(fault, moment="data")
  assert chaos_plan.deliverable_step(data, 7, **kwargs) == 8


# --- launches ------------------------------------------------------------------------------

# A stand-in for a job's process: reaches the 'step' moment of step 3 (where a planned fault
# strikes; SIGTERM is ignored), then logs steps 1 .. argv[2] to metrics.jsonl, one every
# 0.2 s, and ends with a checkpoint directory of the last one.
_FAKE_PROCESS = """
import json, os, signal, sys, time
from psvae_jax import fault_points
signal.signal(signal.SIGTERM, signal.SIG_IGN)
fault_points.reached("step", 3)
workdir, last = sys.argv[1], int(sys.argv[2])
os.makedirs(workdir, exist_ok=True)
for step in range(1, last + 1):
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": step}) + "\\n")
  time.sleep(0.2)
os.makedirs(os.path.join(workdir, "checkpoints", str(last)))
"""


@dataclasses.dataclass
class _FakeJob(chaos_launch.Job):
  last_step: int = 300

  def command(self, process, port):
    return [sys.executable, "-c", _FAKE_PROCESS, self.workdir, str(self.last_step)]


def _fake_job(tmp_path, processes, last_step=300):
  return _FakeJob(config="", overrides=[], workdir=str(tmp_path / "run"), processes=processes,
                  log_dir=str(tmp_path / "logs"), cwd=REPO_ROOT, last_step=last_step)


def test_plan_runs_one_launch_per_fault_then_one_to_the_end(tmp_path):
  fault = chaos_plan.Fault(index=0, moment="step", step=3, signal="SIGKILL", process=0)
  lines = []
  records, problems = chaos._run_plan(_fake_job(tmp_path, 1, last_step=3), [fault],
                                      chaos.Settings(faults=1), checkpoint_every=0,
                                      total_steps=3, log_every=1, say=lines.append)
  assert problems == []
  assert [r.launch.ends[0].returncode for r in records] == [-9, 0]
  assert (records[1].start_step, records[1].logged, records[1].end_step) == (0, [1, 2, 3], 3)
  assert lines[0].startswith("soak00: SIGKILL to process 0 at step of step 3; resumed at step 0")
  assert lines[1].startswith("soak01: no fault; resumed at step 0, reached 3, checkpoint 3")


@pytest.mark.reliability(fault="chaos soak launch: a survivor outlives its killed peer",
                         expected="killed after the survivor bound (2 x --peer_timeout + 30 s) "
                                  "and reported, not waited for")
def test_launch_kills_a_survivor_after_the_survivor_bound(tmp_path):
  fault = chaos_plan.Fault(index=0, moment="step", step=3, signal="SIGKILL", process=1)
  launch = chaos_launch.run(_fake_job(tmp_path, 2), "t", fault=fault, fault_step=3,
                            launch_timeout=50, survivor_bound_s=1)
  assert [e.returncode for e in launch.ends] == [None, -9]
  assert launch.delivered_s is not None and not launch.timed_out
  assert launch.ends[0].seconds - launch.ends[1].seconds < 5  # not the minute it sleeps
  record = chaos_outcome.LaunchRecord(launch, start_step=0, end_step=0, logged=[])
  problems = chaos_outcome.check(record, total_steps=8, log_every=1, survivor_bound_s=1)
  assert problems == ["t: process 0 still running 1 s after process 1 ended (SIGKILL); killed"]


@pytest.mark.reliability(fault="chaos soak launch: a process trains on after its SIGTERM",
                         expected="killed once the job is --term_grace_steps past, reported")
def test_launch_kills_a_process_that_trains_on_after_sigterm(tmp_path):
  fault = chaos_plan.Fault(index=0, moment="step", step=3, signal="SIGTERM", process=0)
  launch = chaos_launch.run(_fake_job(tmp_path, 1), "t", fault=fault, fault_step=3,
                            launch_timeout=50, survivor_bound_s=1, term_grace_steps=2)
  assert launch.ignored_sigterm_at == 7 and launch.ends[0].returncode == -9
  record = chaos_outcome.LaunchRecord(launch, start_step=0, end_step=0, logged=[1, 2, 3, 4, 5,
                                                                                6, 7])
  assert _check(record) == ["t: process 0 went on training after SIGTERM at step 3 (step 7 "
                            "logged); killed"]


@pytest.mark.reliability(fault="chaos soak launch: a launch hangs",
                         expected="killed at --launch_timeout and reported as hung")
def test_launch_kills_a_hung_launch_at_its_timeout(tmp_path):
  launch = chaos_launch.run(_fake_job(tmp_path, 1), "t", launch_timeout=1, survivor_bound_s=1)
  assert launch.timed_out and launch.ends[0].returncode is None and launch.wall_s < 20


def test_launch_logs_and_steps_on_disk(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "4").mkdir(parents=True)
  (workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1").mkdir()
  assert chaos_launch.complete_steps(str(workdir)) == [4]
  (workdir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
  offset = chaos_launch.metrics_size(str(workdir))
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 3}\n{"step": 4, "lo')  # the last line cut by a kill
  assert chaos_launch.logged_steps(str(workdir)) == [1, 2, 3]
  assert chaos_launch.logged_steps(str(workdir), offset) == [3]
  data = workdir / "checkpoints" / "4" / "data"
  data.mkdir()
  for name in ("commit_success.txt", "process_1-of-2.json", "process_0-of-2.json"):
    (data / name).write_text("{}")
  assert chaos_launch.data_positions(str(workdir), 4) == ["process_0-of-2.json",
                                                          "process_1-of-2.json"]
  assert chaos_launch.data_positions(str(workdir), 8) == []


def test_launch_reads_each_process_start_step_from_its_log_file(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  first = "I1206 10:00:00.0 root train.py:256] start at step 0 (scratch); 10 trainable\n"
  (workdir / "log.txt").write_text(first)
  offset = len(first)
  with open(workdir / "log.txt", "a") as f:
    f.write("I1206 10:01:00.0 root train.py:256] start at step 12 (workdir step 12); 10\n")
  (workdir / "log.process1.txt").write_text(
      "I1206 10:01:00.0 root train.py:256] start at step 8 (workdir step 8); 10\n")
  assert chaos_launch.started_step(str(workdir), 0) == 0
  assert chaos_launch.started_step(str(workdir), 0, offset) == 12
  assert chaos_launch.started_step(str(workdir), 1) == 8
  assert chaos_launch.started_step(str(workdir), 2) is None


def test_job_passes_the_peer_timeout_to_several_processes_only():
  job = chaos_launch.Job(config="c.py", overrides=[], workdir="/w", processes=2, log_dir="/l",
                         peer_timeout_s=5)
  command = job.command(1, 1234)
  assert "--peer_timeout_s=5" in command and "--process_id=1" in command
  assert "--peer_timeout_s=5" not in dataclasses.replace(job, processes=1).command(0, 0)


# --- outcome checks and the table ----------------------------------------------------------

def _record(tag, fault, start, end, logged, returncodes, delivered=1.0, timed_out=False,
            logs=None, log_dir=None, started=(), positions=()):
  """A launch record; `logs`: each process's console text (written under `log_dir`)."""
  paths = ["/nonexistent"] * len(returncodes)
  if logs is not None:
    paths = [os.path.join(log_dir, f"{tag}.process{p}.log") for p in range(len(logs))]
    for path, text in zip(paths, logs):
      with open(path, "w") as f:
        f.write(text)
  ends = [ProcessEnd(p, rc, 2.0, paths[p]) for p, rc in enumerate(returncodes)]
  launch = Launch(tag=tag, fault=fault, fault_step=fault.step if fault else None, ends=ends,
                  wall_s=10.0, delivered_s=delivered if fault else None, timed_out=timed_out,
                  started=list(started))
  return chaos_outcome.LaunchRecord(launch, start_step=start, end_step=end, logged=logged,
                                    positions=list(positions))


def _fault(moment, step, signal_name, process=0):
  return chaos_plan.Fault(index=0, moment=moment, step=step, signal=signal_name,
                          process=process)


def _check(record, total_steps=12):
  return chaos_outcome.check(record, total_steps=total_steps, log_every=1, survivor_bound_s=30)


def _lost(process):
  return (f"error: lost contact with process {process} (no heartbeat for --peer_timeout_s=5 s); "
          "this process stopped. Restart all processes to resume\n")


def _agreed(step):
  return (f"warning: stop requested (SIGTERM to process 1): all 2 processes save at step {step} "
          "and exit\n")


TWO_POSITIONS = ["process_0-of-2.json", "process_1-of-2.json"]


def test_outcome_accepts_what_each_fault_should_do(tmp_path):
  kill = _record("a", _fault("step", 5, "SIGKILL"), 0, 4, [1, 2, 3, 4, 5], [-9])
  term = _record("b", _fault("save", 7, "SIGTERM"), 4, 8, [5, 6, 7, 8], [143], started=[4])
  final = _record("c", None, 8, 12, [9, 10, 11, 12], [0], started=[8])
  peer = _record("d", _fault("data", 5, "SIGKILL", 1), 0, 4, [1, 2, 3, 4], [75, -9],
                 logs=["step 4/12\n" + _lost(1), ""], log_dir=tmp_path, started=[0, 0])
  coordinator = _record("e", _fault("step", 5, "SIGKILL", 0), 0, 4, [1, 2, 3, 4], [-9, 75],
                        logs=["", "error: lost contact with process 0, the coordinator ("
                              "connection closed; --peer_timeout_s=5 s); this process\n"],
                        log_dir=tmp_path)
  # The agreed step may lie past the step after the fault (a process was a step ahead).
  both_stop = _record("f", _fault("between", 5, "SIGTERM", 1), 4, 7, [5, 6, 7], [143, 143],
                      logs=[_agreed(7), _agreed(7)], log_dir=tmp_path,
                      positions=["commit_success.txt", *TWO_POSITIONS])
  assert [_check(r) for r in (kill, term, final, peer, coordinator, both_stop)] == [[]] * 6


def test_outcome_after_an_ignored_sigterm_treats_the_others_as_survivors(tmp_path):
  fault = _fault("step", 5, "SIGTERM", 1)
  survivor_exits = _record("a", fault, 4, 4, [5, 6, 7, 8, 9, 10], [75, -9],
                           logs=[_lost(1), ""], log_dir=tmp_path)
  survivor_exits.launch.ignored_sigterm_at = 10
  assert _check(survivor_exits) == [
      "a: process 1 went on training after SIGTERM at step 5 (step 10 logged); killed"]
  survivor_hangs = _record("b", fault, 4, 4, [5, 6, 7, 8, 9, 10], [None, -9])
  survivor_hangs.launch.ignored_sigterm_at = 10
  assert len(_check(survivor_hangs)) == 2
  assert _check(survivor_hangs)[1] == ("b: process 0 still running 30 s after process 1 ended "
                                       "(killed by the soak); killed")


def test_outcome_reports_hangs_wrong_exits_and_wrong_resumes():
  crash = _record("a", _fault("save", 3, "SIGTERM"), 0, 4, [1, 2, 3, 4], [1])
  assert "ended with exit 1 after SIGTERM to process 0, expected exit 143" in _check(crash)[0]
  no_save = _record("b", _fault("step", 5, "SIGTERM"), 4, 4, [5, 6], [143])
  assert "the newest checkpoint is 4, expected 6" in _check(no_save)[0]
  hung_peer = _record("c", _fault("step", 5, "SIGKILL", 0), 0, 4, [1, 2, 3], [-9, None])
  assert "process 1 still running 30 s after process 0 ended (SIGKILL)" in _check(hung_peer)[0]
  undelivered = _record("d", _fault("step", 5, "SIGKILL"), 0, 12, list(range(1, 13)), [0],
                        delivered=None)
  assert "was not delivered" in _check(undelivered)[0]
  wrong_resume = _record("e", None, 8, 12, [5, 6, 7, 8, 9, 10, 11, 12], [0])
  assert "resumed at step 4, not at the newest complete checkpoint 8" in _check(wrong_resume)[0]
  hung = _record("f", None, 8, 8, [9], [None], timed_out=True)
  assert "still running at the launch timeout" in _check(hung)[0]
  not_killed = _record("g", _fault("step", 5, "SIGKILL"), 4, 4, [5], [137])
  assert _check(not_killed) == ["g: process 0 ended with exit 137 after SIGKILL to process 0, "
                                "expected signal 9 ()"]


@pytest.mark.reliability(fault="chaos soak, two processes: a survivor of a SIGKILLed peer "
                               "fails otherwise, or one process resumes elsewhere",
                         expected="reported as a problem (the soak exits 1)")
def test_outcome_reports_a_survivor_that_does_not_name_its_lost_peer(tmp_path):
  fault = _fault("step", 5, "SIGKILL", 1)
  crashed = _record("a", fault, 0, 4, [1, 2, 3, 4], [1, -9], logs=["Traceback\n", ""],
                    log_dir=tmp_path)
  assert _check(crashed) == ["a: process 0 ended with exit 1 after process 1 ended (SIGKILL), "
                             "expected exit 75 (Traceback)"]
  silent = _record("b", fault, 0, 4, [1, 2, 3, 4], [75, -9], logs=[_lost(0), ""],
                   log_dir=tmp_path)
  assert _check(silent) == ["b: process 0 exited 75 without the line 'error: lost contact "
                            "with process 1' (" + _lost(0).strip() + ")"]
  elsewhere = _record("c", None, 8, 12, [9, 10, 11, 12], [0, 0], started=[8, 4])
  assert _check(elsewhere) == ["c: process 1 started at step 4, not at the newest complete "
                               "checkpoint 8"]


@pytest.mark.reliability(fault="chaos soak, two processes: SIGTERM to one, the processes stop "
                               "at different steps, too early, or without one joint checkpoint",
                         expected="reported as a problem (the soak exits 1)")
def test_outcome_reports_a_torn_or_missing_preemption_checkpoint(tmp_path):
  fault = _fault("step", 5, "SIGTERM", 1)
  kwargs = dict(log_dir=tmp_path, positions=TWO_POSITIONS)
  torn = _record("a", fault, 4, 7, [5, 6, 7], [143, 143], logs=[_agreed(7), _agreed(8)],
                 **kwargs)
  assert _check(torn) == ["a: after SIGTERM at step 5 the processes did not name one agreed "
                          "stop step (process 0: step 7, process 1: step 8)"]
  silent = _record("b", fault, 4, 7, [5, 6, 7], [143, 143], logs=[_agreed(7), ""], **kwargs)
  assert "(process 0: step 7, process 1: none)" in _check(silent)[0]
  early = _record("c", fault, 4, 5, [5], [143, 143], logs=[_agreed(5)] * 2, **kwargs)
  assert _check(early) == ["c: the agreed stop step 5 is before the step after the fault (6)"]
  unsaved = _record("d", fault, 4, 4, [5, 6, 7], [143, 143], logs=[_agreed(7)] * 2, **kwargs)
  assert _check(unsaved) == ["d: after SIGTERM at step 5 the newest checkpoint is 4, not the "
                             "agreed stop step 7"]
  half = _record("e", fault, 4, 7, [5, 6, 7], [143, 143], logs=[_agreed(7)] * 2,
                 log_dir=tmp_path, positions=TWO_POSITIONS[:1])
  assert _check(half) == ["e: checkpoint 7 lacks the data position of process(es) [1] (it "
                          "holds ['process_0-of-2.json'])"]
  one_left = _record("f", fault, 4, 7, [5, 6, 7], [143, 75], logs=[_agreed(7)] * 2, **kwargs)
  assert _check(one_left) == ["f: process 1 ended with exit 75 after SIGTERM to process 1, "
                              "expected exit 143 (" + _agreed(7).strip() + ")"]


def test_table_counts_faults_restarts_recomputed_steps_and_overhead():
  records = [
      _record("a", _fault("step", 5, "SIGKILL"), 0, 4, [1, 2, 3, 4, 5], [-9]),  # 1 lost
      _record("b", _fault("save", 7, "SIGTERM"), 4, 8, [5, 6, 7, 8], [143]),  # none lost
      _record("c", _fault("between", 10, "SIGKILL"), 8, 8, [9, 10, 11], [-9]),  # 3 lost
      _record("d", None, 8, 12, [9, 10, 11, 12], [0]),
  ]
  assert chaos_report.steps_recomputed(records) == 4
  summary = chaos_report.summarize(records, processes=1, problems=[], uninterrupted_s=20.0,
                                   differences=[])
  assert summary.ok and summary.faults == 3 and summary.restarts == 3
  lines = chaos_report.table(summary).splitlines()
  assert lines[0].startswith("| processes | faults | SIGKILL (data/step/save/between) |")
  assert lines[2] == "| 1 | 3 | 2 (0/1/0/1) | 1 (0/0/1/0) | 3 | 4 | 0 | 40 | 20 | +100% | yes |"


def test_table_says_no_and_lists_what_differs():
  differences = [chaos_compare.Difference("ema/w.value", "1 of 4 elements differ"),
                 chaos_compare.Difference("data/process_0-of-1.json", "stored bytes differ")]
  summary = chaos_report.summarize([_record("a", None, 0, 12, [12], [0])], processes=2,
                                   problems=["a: something"], uninterrupted_s=None,
                                   differences=differences)
  assert not summary.ok
  text = chaos_report.table(summary)
  assert text.splitlines()[2].endswith("| n/a | n/a | no |")
  assert "problem: a: something" in text
  assert "differs: EMA: 1 entries: ema/w.value: 1 of 4 elements differ" in text
  assert "differs: data position: 1 entries" in text


# --- the comparison ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
  """The arrays and data position of a 2-step toy run's final checkpoint (`read_step`)."""
  from helpers.toy_task import TOY_TASK_ENTRY, toy_config
  from psvae_jax.tasks import TASKS
  workdir = str(tmp_path_factory.mktemp("chaos_toy"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(TASKS, "toy", TOY_TASK_ENTRY)
    train_lib.train(toy_config(total_steps=2), workdir)
  return chaos_compare.read_step(os.path.join(workdir, "checkpoints"), 2)


def _flip_one_bit(read, key):
  changed = copy.deepcopy(read)
  value = changed[key]
  if isinstance(value, bytes):
    changed[key] = bytes([value[0] ^ 1]) + value[1:]
  else:
    flat = value.reshape(-1).view(np.uint8)
    flat[flat.size // 2] ^= 1
  return changed


@pytest.mark.parametrize("part", ["params", "EMA", "optimizer state", "data position"])
def test_compare_detects_one_flipped_bit(toy_checkpoint, part):
  assert chaos_compare.compare(toy_checkpoint, copy.deepcopy(toy_checkpoint)) == []
  key = next(k for k in sorted(toy_checkpoint) if chaos_compare.category(k) == part
             and (isinstance(toy_checkpoint[k], bytes) or toy_checkpoint[k].size > 1))
  differences = chaos_compare.compare(toy_checkpoint, _flip_one_bit(toy_checkpoint, key))
  assert [(d.key, d.category) for d in differences] == [(key, part)]
  if part != "data position":
    assert differences[0].what == f"1 of {toy_checkpoint[key].size} elements differ"


def test_read_step_holds_every_part(toy_checkpoint):
  categories = {chaos_compare.category(k) for k in toy_checkpoint}
  assert categories == set(chaos_compare.CATEGORIES)
  data = [k for k in toy_checkpoint if k.startswith("data/")]
  assert data and all(chaos_compare.COMMIT_MARKER not in k for k in data)
  assert json.loads(toy_checkpoint[data[0]])["pipeline"]


def test_compare_reports_a_missing_array_and_a_dtype_change(toy_checkpoint):
  key = next(k for k in sorted(toy_checkpoint) if k.startswith("ema/"))
  other = copy.deepcopy(toy_checkpoint)
  other[key] = other[key].astype(np.float64)
  del other[next(k for k in sorted(other) if k.startswith("state/opt_state"))]
  found = {d.category: d.what for d in chaos_compare.compare(toy_checkpoint, other)}
  assert found["EMA"].startswith("float32[") and "vs float64[" in found["EMA"]
  assert found["optimizer state"] == "only in the first"


# --- the fault points in the loop ----------------------------------------------------------

@pytest.mark.reliability(
    fault="SIGTERM delivered at the {moment} moment of a checkpoint step (toy task)",
    expected="the preemption path: checkpoint at that step, Preempted (exit 143)")
@pytest.mark.parametrize("moment", fault_points.MOMENTS)
def test_sigterm_at_each_moment_checkpoints_that_step(tmp_path, monkeypatch, moment):
  from helpers.toy_task import TOY_TASK_ENTRY, toy_config
  from psvae_jax.tasks import TASKS
  monkeypatch.setitem(TASKS, "toy", TOY_TASK_ENTRY)
  # Step 3's result (step 4) is also a regular checkpoint: both saves meet at that step.
  monkeypatch.setattr(fault_points, "_PLAN", (moment, 3, "SIGTERM"))
  marker = tmp_path / "delivered"
  monkeypatch.setenv(fault_points.MARKER_ENV, str(marker))
  workdir = str(tmp_path / "run")
  with pytest.raises(train_lib.Preempted) as preempted:
    train_lib.train(toy_config(total_steps=8, checkpoint_every=2), workdir)
  assert preempted.value.step == 4 and preempted.value.code == 143
  assert marker.read_text().startswith(f"{moment} 3 SIGTERM pid={os.getpid()}")
  assert max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == 4


# A multi-process run's launched process (peer_supervisor) whose worker reaches the 'step'
# moment of step 3; the worker writes its pid and, for SIGTERM, the pid that signalled it.
_SUPERVISED = """
import os, signal, sys
from psvae_jax import peer_supervisor
workdir = sys.argv[1]
status = peer_supervisor.supervise(workdir=workdir, peer_timeout_s=7)
if status is not None:
  sys.exit(status)
open(os.path.join(workdir, "worker.pid"), "w").write(str(os.getpid()))
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
from psvae_jax import fault_points
fault_points.reached("step", 3)
info = signal.sigtimedwait([signal.SIGTERM], 60)
open(os.path.join(workdir, "sender.pid"), "w").write(str(info.si_pid if info else 0))
sys.exit(143)
"""


@pytest.mark.reliability(fault="a planned {name} in a supervised worker (multi-process run)",
                         expected="strikes the launched process, as a scheduler or dying host "
                                  "would")
@pytest.mark.parametrize("name", fault_points.SIGNALS)
def test_a_supervised_worker_strikes_the_launched_process(tmp_path, name):
  env = {**os.environ, fault_points.PLAN_ENV: f"step:3:{name}",
         fault_points.MARKER_ENV: str(tmp_path / "delivered"), "JAX_PLATFORMS": "cpu"}
  launched = subprocess.run([sys.executable, "-c", _SUPERVISED, str(tmp_path)], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
  worker = int((tmp_path / "worker.pid").read_text())
  assert (tmp_path / "delivered").read_text().startswith(f"step 3 {name} pid={worker}")
  if name == "SIGKILL":  # the launched process itself, not only its worker (that would be 137)
    assert launched.returncode == -signal.SIGKILL, launched.stderr
    assert not (tmp_path / "sender.pid").exists()
  else:  # forwarded by the launched process, which passes the worker's exit on
    assert launched.returncode == 143, launched.stderr
    sender = int((tmp_path / "sender.pid").read_text())
    assert sender not in (0, worker), sender


def test_fault_plan_parsing():
  assert fault_points.parse_plan("") is None
  assert fault_points.parse_plan("save:12:SIGKILL") == ("save", 12, "SIGKILL")
  for bad in ("save:12", "lunch:3:SIGKILL", "data:3:SIGINT", "data:-1:SIGTERM"):
    with pytest.raises(ValueError):
      fault_points.parse_plan(bad)


# --- the command line ----------------------------------------------------------------------

def test_soak_refuses_a_used_workdir_and_too_few_steps(tmp_path):
  (tmp_path / "soak").mkdir()
  (tmp_path / "soak" / "metrics.jsonl").write_text("")
  with pytest.raises(errors.UserError, match="already holds a run"):
    chaos.soak(SVAE_SMOKE, [], str(tmp_path), chaos.Settings(faults=2))
  with pytest.raises(errors.UserError, match="needs config.total_steps >= 42"):
    chaos.soak(SVAE_SMOKE, ["--config.total_steps=41"], str(tmp_path / "new"),
               chaos.Settings(faults=20))


def test_job_config_applies_the_soak_settings_before_the_users():
  overrides = chaos.job_overrides(chaos.Settings(faults=1, checkpoint_every=4),
                                  ["--config.checkpoint_every=6", "--config.total_steps=30"])
  config = chaos.job_config(SVAE_SMOKE, overrides)
  assert (config.checkpoint_every, config.log_every, config.total_steps) == (6, 1, 30)
  with pytest.raises(errors.UserError, match="totl_steps"):
    chaos.job_config(SVAE_SMOKE, ["--config.totl_steps=3"])


def test_command_line_flags(parse_flags):
  values = parse_flags(chaos, [f"--config={SVAE_SMOKE}", "--workdir=/tmp/x", "--faults=3",
                               "--processes=2", "--seed=7"])
  assert (values.faults, values.processes, values.seed) == (3, 2, 7)
  assert chaos.user_config_overrides(["--faults=3", "--config.seed=1", "--config=x"]) == [
      "--config.seed=1"]


# --- whole soaks (slow) --------------------------------------------------------------------

# The S-VAE smoke preset shrunk to a step of a fraction of a second (as the crash tests do).
SMALL_JOB = ["--config.eval_every=0", "--config.logging.tensorboard=False",
             "--config.model.svae_depth=1", "--config.model.encoder_resolution=56",
             "--config.model.latent_channels=8", "--config.data.image_size=32",
             "--config.data.synthetic_size=512", "--config.model.pixel_decoder.ch_mult=(1,1,1,2)",
             "--config.model.pixel_decoder.resolution=32", "--config.batch_size=8",
             "--config.eval_batches=1", "--config.optim.ema_decay=0.5",
             "--config.total_steps=36"]


def _soak(tmp_path, *args, timeout):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  env["JAX_PLATFORMS"] = "cpu"
  workdir = tmp_path / "soak"
  result = subprocess.run(
      [sys.executable, "-m", "psvae_jax.tools.chaos", f"--config={SVAE_SMOKE}",
       f"--workdir={workdir}", *args, *SMALL_JOB], cwd=REPO_ROOT, env=env,
      capture_output=True, text=True, timeout=timeout)
  print(result.stderr[-6000:], result.stdout)  # the launches and the table, shown with -s
  report = json.loads((workdir / "chaos_report.json").read_text())
  return result, report


@pytest.mark.slow
@pytest.mark.reliability(fault="chaos soak: 10 random SIGKILL/SIGTERM faults, one process",
                         expected="every relaunch resumes; final state bit-identical")
def test_soak_one_process_ten_faults(tmp_path):
  result, report = _soak(tmp_path, "--faults=10", "--seed=0", timeout=3000)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert report["faults"] == 10 and report["restarts"] == 10 and report["identical"]
  assert report["problems"] == []
  assert "| yes |" in result.stdout.splitlines()[2]


@pytest.mark.slow
@pytest.mark.reliability(fault="chaos soak: 10 random SIGKILL/SIGTERM faults to one of two "
                               "processes",
                         expected="SIGKILL: the survivor exits 75 naming the lost process; "
                                  "SIGTERM: both save one agreed step, exit 143; every relaunch "
                                  "resumes; final state bit-identical")
def test_soak_two_processes_ten_faults(tmp_path):
  result, report = _soak(tmp_path, "--faults=10", "--seed=0", "--processes=2",
                         "--launch_timeout=900", timeout=6000)
  # Seed 0 strikes each process with each signal.
  assert {(f["signal"], f["process"]) for f in report["plan"]} == {
      (s, p) for s in fault_points.SIGNALS for p in (0, 1)}
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert report["faults"] == 10 and report["restarts"] >= 10 and report["identical"]
  assert report["problems"] == []
  assert "| yes |" in result.stdout.splitlines()[2]
