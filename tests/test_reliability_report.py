"""The reliability report runs the marked tests and tabulates their markers and outcomes."""
from psvae_jax.tools import reliability_report as report


def test_summarize_outcomes():
  events = [
      {"event": "case", "nodeid": "a", "fault": "fault a", "expected": "raise"},
      {"event": "phase", "nodeid": "a", "when": "setup", "outcome": "passed", "duration": 0.5,
       "wasxfail": None, "message": ""},
      {"event": "phase", "nodeid": "a", "when": "call", "outcome": "passed", "duration": 1.0,
       "wasxfail": None, "message": ""},
      {"event": "case", "nodeid": "b", "fault": "fault b", "expected": "skip"},
      {"event": "phase", "nodeid": "b", "when": "call", "outcome": "failed", "duration": 0.1,
       "wasxfail": None, "message": "AssertionError: boom"},
      {"event": "case", "nodeid": "c", "fault": "fault c", "expected": "x"},
      {"event": "phase", "nodeid": "c", "when": "call", "outcome": "skipped", "duration": 0.1,
       "wasxfail": "known bug", "message": ""},
  ]
  rows = report.summarize(events)
  assert [r["result"] for r in rows] == ["pass", "FAIL: AssertionError: boom",
                                         "xfail (known problem): known bug"]
  assert rows[0]["seconds"] == 1.5
  assert report.count_results(rows) == {"pass": 1, "known": 1, "failed": 1, "skipped": 0}
  table = report.markdown_table(rows).splitlines()
  assert table[0] == "| fault case | expected outcome | result | s |"
  assert table[3] == "| fault b | skip | FAIL: AssertionError: boom | 0.1 |"


def test_runs_the_marked_tests_and_fills_parameters():
  rows, code = report.run(pytest_args="tests/test_reliability_config.py -k mesh",
                          stream_output=False)
  assert code == 0 and len(rows) == 5
  assert all(r["result"] == "pass" and r["expected"] == "MeshError saying why" for r in rows)
  assert "impossible mesh on 8 devices: {'data': -1, 'fsdp': 3}" in [r["fault"] for r in rows]
