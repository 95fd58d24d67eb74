"""benchmarks.input_pipeline's command line: --help prints usage, flags parse, typos fail."""
import subprocess
import sys

import pytest

from benchmarks import input_pipeline


def test_help_prints_usage_and_exits_0():
  done = subprocess.run([sys.executable, "-m", "benchmarks.input_pipeline", "--help"],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "--batches" in done.stdout and "--repeats" in done.stdout


def test_flags_parse_and_unknown_flags_fail():
  args = input_pipeline.parse_args(["--batches=2", "--repeats=1", "--out=x.json"])
  assert (args.batches, args.repeats, args.out) == (2, 1, "x.json")
  with pytest.raises(SystemExit):
    input_pipeline.parse_args(["--batchs=2"])
