"""sample_bench: GenEval's and DPG-Bench's image layouts from tiny prompt files, restarts that
skip finished prompts, and named errors for bad prompt files."""
import json
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

from psvae_jax.tools import files, sample_bench
from psvae_jax.runs import default_mesh


ONE = default_mesh(jax.devices()[:1])


def _png(path):
  return np.asarray(Image.open(path))


def test_geneval_layout_and_restart(t2i_run, tmp_path):
  metadata = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}],
               "prompt": "a photo of a bench"},
              {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
               "prompt": "a photo of a red car"},
              {"tag": "counting", "include": [{"class": "cat", "count": 2}],
               "prompt": "a photo of two cats"}]
  prompts = tmp_path / "evaluation_metadata.jsonl"
  prompts.write_text("".join(json.dumps(m) + "\n" for m in metadata))
  out = str(tmp_path / "geneval")
  summary = sample_bench.sample_bench(t2i_run, "geneval", str(prompts), out,
                                      samples_per_prompt=2, batch_size=4, mesh=ONE)
  assert summary["written"] == 3 and summary["image_size"] == 64
  for i, meta in enumerate(metadata):
    folder = os.path.join(out, f"{i:05d}")
    assert sorted(os.listdir(folder)) == ["grid.png", "metadata.jsonl", "samples"]
    with open(os.path.join(folder, "metadata.jsonl")) as f:
      assert json.load(f) == meta  # GenEval's evaluate_images.py json.load()s this file
    assert sorted(os.listdir(os.path.join(folder, "samples"))) == ["0000.png", "0001.png"]
    assert _png(os.path.join(folder, "samples", "0000.png")).shape == (64, 64, 3)
    assert _png(os.path.join(folder, "grid.png")).shape == (64, 130, 3)
  first = _png(os.path.join(out, "00002", "samples", "0001.png"))
  os.remove(os.path.join(out, "00002", "samples", "0001.png"))
  again = sample_bench.sample_bench(t2i_run, "geneval", str(prompts), out,
                                    samples_per_prompt=2, batch_size=4, mesh=ONE)
  # Groups of 2 prompts: the first group is done, the second is sampled again, identically.
  assert again["written"] == 1 and again["skipped_existing"] == 2
  np.testing.assert_array_equal(_png(os.path.join(out, "00002", "samples", "0001.png")), first)


def test_dpg_layout(t2i_run, tmp_path):
  folder = tmp_path / "prompts"
  folder.mkdir()
  (folder / "partiprompts12.txt").write_text("A red cube on top of a blue sphere.\n")
  (folder / "coco3.txt").write_text("Two dogs on a beach.")
  (folder / "notes.md").write_text("ignored")
  out = str(tmp_path / "dpg")
  summary = sample_bench.sample_bench(t2i_run, "dpg", str(folder), out, samples_per_prompt=4,
                                      batch_size=4, mesh=ONE)
  assert summary["written"] == 2 and "--resolution 64 --pic-num 4" in summary["score_with"]
  assert sorted(os.listdir(out)) == ["coco3.png", "partiprompts12.png", "sample_bench.json"]
  grid = _png(os.path.join(out, "coco3.png"))
  assert grid.shape == (128, 128, 3)  # 2x2 tiles of 64 px, no gutters


def test_bad_prompt_files(tmp_path):
  bad = tmp_path / "meta.jsonl"
  bad.write_text('{"tag": "colors"}\n')
  with pytest.raises(ValueError, match="meta.jsonl:1: expected a JSON object with a 'prompt'"):
    sample_bench.read_geneval_prompts(str(bad))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    sample_bench.read_dpg_prompts(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no .txt prompt files"):
    sample_bench.read_dpg_prompts(str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="at most 4 images"):
    sample_bench.sample_bench("unused", "dpg", str(tmp_path), str(tmp_path / "o"),
                              samples_per_prompt=5)


def test_a_killed_write_leaves_nothing_the_scorers_read(tmp_path, monkeypatch):
  """GenEval scores the files of samples/ whose names start with r'\\d+\\.png'; DPG-Bench every
  file of its folder, keyed by the name before the first dot. A write killed before its rename
  leaves only the temporary file, whose name must match neither."""
  temporaries = []

  def killed(src, dst):
    temporaries.append(os.path.basename(src))
    raise KeyboardInterrupt

  monkeypatch.setattr(files.os, "replace", killed)
  samples = tmp_path / "00000" / "samples"
  for path in (samples / "0000.png", tmp_path / "prompt_1.png"):
    with pytest.raises(KeyboardInterrupt):
      files.write_png(str(path), np.zeros((4, 4, 3), np.uint8))
  assert len(temporaries) == 2
  assert not any(re.match(r"\d+\.png", name) for name in temporaries)
  assert all(name.split(".")[0] == "" for name in temporaries)
  assert not os.listdir(samples) and os.listdir(tmp_path) == ["00000"]

