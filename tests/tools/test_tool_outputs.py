"""The tools' shared output writers and command-line checks."""
import json
import os

import numpy as np
import pytest
from absl import app, flags
from PIL import Image

from psvae_jax.tools import cli, files


def test_files_are_written_whole(tmp_path, monkeypatch):
  target = tmp_path / "deep" / "dir" / "x.png"
  image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
  files.write_png(str(target), image)
  np.testing.assert_array_equal(np.asarray(Image.open(target)), image)
  files.write_json(str(tmp_path / "r.json"), {"a": [1, 2]})
  assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1, 2]}
  assert (tmp_path / "r.json").read_text().endswith("\n")
  assert sorted(os.listdir(tmp_path)) == ["deep", "r.json"]  # no temporary left behind

  def fail(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    files.write_bytes(str(target), b"truncated")
  np.testing.assert_array_equal(np.asarray(Image.open(target)), image)  # the old file stands
  assert os.listdir(target.parent) == ["x.png"]


def test_beside():
  assert files.beside("out/eval.json", "_grid.png") == "out/eval_grid.png"
  assert files.beside("out/eval", "_grid.png") == "out/eval_grid.png"


def test_cli_checks_and_json_main(capsys):
  values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  flags.DEFINE_string("out", "", "", flag_values=values)
  values(["tool", "--workdir=/w"])
  with pytest.raises(app.UsageError, match="--out is required"):
    cli.require_flags(values, "workdir", "out")
  main = cli.json_main(lambda: {"score": 0.5, "detail": [1]}, keys=("score",))
  with pytest.raises(app.UsageError, match=r"unexpected arguments: \['extra'\]"):
    main(["tool", "extra"])
  main(["tool"])
  assert json.loads(capsys.readouterr().out) == {"score": 0.5}


def test_write_result_names_its_file(tmp_path):
  out = str(tmp_path / "r.json")
  assert files.write_result(out, {"score": 1.0}) == {"score": 1.0, "json": out}
  assert json.loads(open(out).read()) == {"score": 1.0}
