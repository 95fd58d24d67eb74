"""sample: one prompt -> one PNG (tiled samples), a prompts file -> a directory of PNGs and
its manifest, seeds that reproduce, edit runs sampled text-to-image, and named errors."""
import json
import os

import jax
import numpy as np
import pytest
from absl import app
from PIL import Image

from psvae_jax.tools import sample
from psvae_jax.runs import default_mesh

from helpers.runs import STEP, write_run

ONE = default_mesh(jax.devices()[:1])


def _png(path):
  return np.asarray(Image.open(path))


def test_one_prompt_and_seeds(t2i_run, tmp_path, parse_flags):
  out = str(tmp_path / "sub" / "x.png")
  result = sample.run_from_flags(parse_flags(sample, [
      f"--workdir={t2i_run}", "--prompt=a red circle", f"--out={out}"]), mesh=ONE)
  assert _png(out).shape == (64, 64, 3)
  assert result["step"] == STEP and result["weights"] == "ema" and result["sample_steps"] == 2
  assert result["batch_size"] == 1 and result["task"] == "t2i"
  again = str(tmp_path / "again.png")
  sample.sample_prompt(t2i_run, "a red circle", again, mesh=ONE)
  np.testing.assert_array_equal(_png(again), _png(out))
  other = str(tmp_path / "other.png")
  sample.sample_prompt(t2i_run, "a red circle", other, seed=1, mesh=ONE)
  assert not np.array_equal(_png(other), _png(out))
  tiled = str(tmp_path / "tiled.png")
  result = sample.sample_prompt(t2i_run, "a blue square", tiled, num_samples=3, batch_size=2,
                                sample_steps=1, cfg_scale=2.0, mesh=ONE)
  assert _png(tiled).shape == (2 * 64 + 2, 2 * 64 + 2, 3)  # 3 samples in a 2x2 grid
  assert result["sample_steps"] == 1 and result["cfg_scale"] == 2.0


def test_prompts_file(t2i_run, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\n\n  A Blue/Square?  \nan orange triangle\n")
  out = tmp_path / "out"
  result = sample.sample_prompts_file(t2i_run, str(prompts), str(out), num_samples=2,
                                      batch_size=4, mesh=ONE)
  assert result["num_prompts"] == 3 and result["files"] == 6
  names = ["0000_a-red-circle_0.png", "0000_a-red-circle_1.png", "0001_a-blue-square_0.png",
           "0001_a-blue-square_1.png", "0002_an-orange-triangle_0.png",
           "0002_an-orange-triangle_1.png"]
  assert sorted(os.listdir(out)) == sorted(names + ["prompts.jsonl"])
  for name in names:
    assert _png(out / name).shape == (64, 64, 3)
  lines = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
  assert [line["file"] for line in lines] == names
  assert lines[2]["prompt"] == "A Blue/Square?" and lines[2]["sample"] == 0
  assert {line["seed"] for line in lines} == {0} and lines[0]["batch_size"] == 4
  assert lines[0]["sample_steps"] == 2 and lines[0]["step"] == STEP


def test_edit_run_samples_text_to_image(tmp_path):
  from helpers.configs import tiny_edit_config

  workdir = str(tmp_path / "edit_run")
  write_run(workdir, tiny_edit_config())
  out = str(tmp_path / "edit.png")
  result = sample.sample_prompt(workdir, "make it blue", out, mesh=ONE)
  assert result["task"] == "edit" and _png(out).shape == (32, 32, 3)


def test_bad_inputs_are_named(t2i_run, tmp_path, monkeypatch, parse_flags):
  with pytest.raises(app.UsageError, match="--workdir is required"):
    sample.run_from_flags(parse_flags(sample, ["--prompt=x", "--out=x.png"]))
  with pytest.raises(app.UsageError, match="exactly one of --prompt.*not both"):
    sample.run_from_flags(parse_flags(sample, [
        f"--workdir={t2i_run}", "--prompt=x", "--prompts=p.txt", "--out=o"]))
  with pytest.raises(app.UsageError, match="exactly one of --prompt"):
    sample.run_from_flags(parse_flags(sample, [f"--workdir={t2i_run}", "--out=o"]))
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  with pytest.raises(ValueError, match="empty.txt holds no prompts"):
    sample.sample_prompts_file(t2i_run, str(empty), str(tmp_path / "o"))
  with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
    sample.sample_prompts_file(t2i_run, str(tmp_path / "missing.txt"), str(tmp_path / "o"))
  with pytest.raises(IsADirectoryError, match="is a directory; --prompt writes one PNG"):
    sample.sample_prompt(t2i_run, "x", str(tmp_path))
  with pytest.raises(FileExistsError, match="empty.txt is an existing file"):
    sample.sample_prompts_file(t2i_run, str(empty), str(empty))
  with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
    sample.sample_prompt(str(tmp_path / "nowhere"), "x", str(tmp_path / "x.png"))
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    sample.sample_prompt(t2i_run, "x", str(tmp_path / "x.png"), batch_size=4)
  with pytest.raises(ValueError, match="num_samples=0 must be >= 1"):
    sample.sample_prompt(t2i_run, "x", str(tmp_path / "x.png"), num_samples=0)
  monkeypatch.setattr(sample, "run_config", lambda workdir: {"task": "psvae"})
  with pytest.raises(ValueError, match="t2i or edit runs; this run is config.task='psvae'"):
    sample.sample_prompt(t2i_run, "x", str(tmp_path / "x.png"))
