"""Runs the reliability tests and prints, for each fault case, what should happen and what did.

  python -m psvae_jax.tools.reliability_report                  # fast cases (a few minutes)
  python -m psvae_jax.tools.reliability_report --include_slow   # + SIGKILL of real runs etc.
  python -m psvae_jax.tools.reliability_report --pytest_args="-k checkpoint" --out=report.md

The cases are the tests marked `@pytest.mark.reliability(fault=..., expected=...)` (placeholders
such as '{case}' are filled from the test's parameters). pytest runs in a fresh process (the
tests configure jax before it is imported); this file, copied under a neutral module name, is
its plugin and records each test's marker and outcome. The table is Markdown: fault case,
expected outcome, result (pass / FAIL / ERROR / skip / xfail for a known, documented problem),
seconds. Exit status 1 when any case failed.

This module imports nothing from psvae_jax at load time, so that it can serve as that plugin.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN_NAME = "psvae_reliability_plugin"
EVENTS_ENV = "PSVAE_RELIABILITY_EVENTS"


# --- the pytest plugin (active only inside the pytest process) -----------------------------

class _Params(dict):
  """format_map mapping that leaves unknown placeholders as they are."""

  def __missing__(self, key):
    return "{" + key + "}"


def _describe(item) -> dict:
  mark = item.get_closest_marker("reliability")
  kwargs = dict(mark.kwargs) if mark is not None else {}
  params = _Params(getattr(getattr(item, "callspec", None), "params", {}) or {})
  doc = (getattr(item, "obj", None).__doc__ or "").strip().splitlines()
  fault = kwargs.get("fault") or (doc[0] if doc else item.originalname.replace("_", " "))
  try:
    fault = fault.format_map(params)
    expected = kwargs.get("expected", "").format_map(params)
  except (ValueError, IndexError, AttributeError):
    expected = kwargs.get("expected", "")
  return {"event": "case", "nodeid": item.nodeid, "fault": fault, "expected": expected}


def _emit(record: dict) -> None:
  path = os.environ.get(EVENTS_ENV)
  if path:
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")


def pytest_runtest_protocol(item, nextitem):  # pylint: disable=unused-argument
  """pytest hook: records the case's description before it runs."""
  _emit(_describe(item))


def pytest_runtest_logreport(report):
  """pytest hook: records each phase's outcome."""
  message = ""
  if report.failed:
    message = str(getattr(report, "longreprtext", "") or report.longrepr or "").strip()
    message = message.splitlines()[-1] if message else ""
  elif report.skipped and isinstance(report.longrepr, tuple):
    message = str(report.longrepr[2])
  _emit({"event": "phase", "nodeid": report.nodeid, "when": report.when,
         "outcome": report.outcome, "duration": report.duration,
         "wasxfail": getattr(report, "wasxfail", None), "message": message})


# --- collecting the results --------------------------------------------------------------------

def summarize(events: list[dict]) -> list[dict]:
  """Rows (fault, expected, result, seconds) from the plugin's events, in run order."""
  rows: dict[str, dict] = {}
  for event in events:
    row = rows.setdefault(event["nodeid"], {"nodeid": event["nodeid"], "fault": event["nodeid"],
                                            "expected": "", "result": "pass", "seconds": 0.0})
    if event["event"] == "case":
      row.update(fault=event["fault"], expected=event["expected"])
      continue
    row["seconds"] += event["duration"]
    if event["wasxfail"] is not None:  # an expected failure: skipped = still failing
      row["result"] = (f"xfail (known problem): {event['wasxfail']}"
                       if event["outcome"] == "skipped" else
                       "XPASS: the known problem is gone; remove the xfail")
    elif event["outcome"] == "failed":
      row["result"] = ("FAIL: " if event["when"] == "call" else "ERROR: ") + event["message"]
    elif event["outcome"] == "skipped":
      row["result"] = f"skip: {event['message']}"
  return list(rows.values())


def markdown_table(rows: list[dict], limit: int = 100) -> str:
  """The rows as a Markdown table (cells shortened to `limit` characters)."""
  def cell(text):
    text = " ".join(str(text).split()).replace("|", "\\|")
    return textwrap.shorten(text, limit, placeholder="...") if len(text) > limit else text

  lines = ["| fault case | expected outcome | result | s |", "|---|---|---|---:|"]
  for row in rows:
    lines.append(f"| {cell(row['fault'])} | {cell(row['expected'])} | {cell(row['result'])} | "
                 f"{row['seconds']:.1f} |")
  return "\n".join(lines)


def count_results(rows: list[dict]) -> dict[str, int]:
  """{'pass', 'known', 'failed', 'skipped'}: known = xfail (a documented open problem)."""
  kinds = {"pass": 0, "known": 0, "failed": 0, "skipped": 0}
  for row in rows:
    result = row["result"]
    kind = ("pass" if result == "pass" else "known" if result.startswith("xfail") else
            "skipped" if result.startswith("skip") else "failed")
    kinds[kind] += 1
  return kinds


def run(include_slow: bool = False, pytest_args: str = "", python: str = sys.executable,
        stream_output: bool = True) -> tuple[list[dict], int]:
  """Runs the reliability tests in a pytest subprocess; returns (rows, pytest exit code)."""
  marker = "reliability" if include_slow else "reliability and not slow"
  with tempfile.TemporaryDirectory(prefix="psvae_reliability_") as tmp:
    shutil.copyfile(os.path.abspath(__file__), os.path.join(tmp, PLUGIN_NAME + ".py"))
    events_path = os.path.join(tmp, "events.jsonl")
    env = dict(os.environ)
    env[EVENTS_ENV] = events_path
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tmp, env.get("PYTHONPATH", "")]))
    # An unrelated module that fails to import must not hide the cases of the others.
    command = [python, "-m", "pytest", "-p", PLUGIN_NAME, "-m", marker, "-q", "-rfEx",
               "--continue-on-collection-errors", *shlex.split(pytest_args)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, check=False,
                            stdout=None if stream_output else subprocess.DEVNULL,
                            stderr=None if stream_output else subprocess.DEVNULL)
    events = []
    if os.path.exists(events_path):
      with open(events_path) as f:
        events = [json.loads(line) for line in f if line.strip()]
  return summarize(events), result.returncode


# --- command line --------------------------------------------------------------------------

def define_flags(flag_values=None) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  from absl import flags
  f = dict(flag_values=flag_values or flags.FLAGS)
  flags.DEFINE_bool("include_slow", False, "Also run the slow cases (@pytest.mark.slow): "
                    "SIGKILL of real training runs, long resumes.", **f)
  flags.DEFINE_string("pytest_args", "", "Extra pytest arguments, e.g. '-k data -x'.", **f)
  flags.DEFINE_string("out", "", "Also write the Markdown table to this file.", **f)


def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  v = flags.FLAGS
  rows, code = run(include_slow=v.include_slow, pytest_args=v.pytest_args)
  if not rows:
    raise app.UsageError(f"no reliability case ran (pytest exit code {code}); "
                         f"check --pytest_args={v.pytest_args!r}")
  table = markdown_table(rows)
  n = count_results(rows)
  summary = (f"{len(rows)} fault cases: {n['pass']} as expected, {n['known']} known open "
             f"problems (xfail), {n['skipped']} skipped, {n['failed']} FAILED"
             f"{' (slow cases included)' if v.include_slow else ' (slow cases: --include_slow)'}")
  if code not in (0, 1, 5):  # 1 = some test failed (in the table)
    summary += f"; pytest exit code {code} (collection errors? see its output above)"
  elif code == 1 and not n["failed"]:
    summary += "; pytest exit code 1 without a failed case: a module failed to import (above)"
  print("\n" + table + "\n\n" + summary)
  if v.out:
    with open(v.out, "w") as f:
      f.write(table + "\n\n" + summary + "\n")
  sys.exit(1 if n["failed"] or code not in (0, 5) else 0)


if __name__ == "__main__":
  from absl import app as _app
  define_flags()
  _app.run(main)
