"""eval_t2i: single-object prompts in the world's caption format, the detector's verdicts on
rendered ground truth, and the tool end to end (trained EMA and random-init generator) on a
tiny T2I run written from its layout."""
import json

import numpy as np
import pytest
from PIL import Image

from psvae_jax.data import synthetic
from psvae_jax.tools import eval_t2i
from psvae_jax.runs import run_config

from helpers.runs import STEP


def test_prompts_use_the_world_caption_format():
  prompts = eval_t2i.single_object_prompts(20)
  assert prompts[0] == ("a red circle", "red", "circle")
  assert prompts[16] == ("an orange square", "orange", "square")
  assert prompts[18] == prompts[0]  # cycles through the 18 colour-shape pairs
  assert len({p for p, _, _ in prompts[:18]}) == 18
  captions = {synthetic.single_example(i, 64)["caption"] for i in range(200)}
  assert {p for p, _, _ in prompts[:18]} <= captions  # the training captions say it so too
  with pytest.raises(ValueError, match="num_prompts"):
    eval_t2i.single_object_prompts(0)


def test_ground_truth_renders_score_one():
  prompts = eval_t2i.single_object_prompts(18)
  verdicts = []
  for i, (_, colour, shape) in enumerate(prompts):
    obj = synthetic.sample_object(np.random.default_rng(i), 1, 1, shape=shape, colour=colour)
    verdicts.append(eval_t2i.score_image(synthetic.render(synthetic.Scene((obj,)), 64),
                                         colour, shape))
  summary = eval_t2i.summarize(prompts, verdicts)
  assert summary["score"] == summary["colour_acc"] == summary["shape_acc"] == 1.0
  assert summary["one_object"] == 1.0 and summary["n"] == 18
  # A blank image finds nothing: wrong on both counts.
  blank = np.full((64, 64, 3), synthetic.BACKGROUND_LEVEL, np.uint8)
  assert eval_t2i.score_image(blank, "red", "circle") == {
      "colour_ok": False, "shape_ok": False, "ok": False, "num_objects": 0, "detected": None}
  # Right colour, wrong shape.
  square = synthetic.Scene((synthetic.sample_object(np.random.default_rng(0), 1, 1,
                                                    shape="square", colour="red"),))
  verdict = eval_t2i.score_image(synthetic.render(square, 64), "red", "circle")
  assert verdict["colour_ok"] and not verdict["shape_ok"] and not verdict["ok"]


def test_tool_writes_scores_and_grid(t2i_run, tmp_path, parse_flags):
  out = tmp_path / "scores.json"
  # 10 prompts over 8 devices: one batch of 16, padded.
  result = eval_t2i.run_from_flags(parse_flags(eval_t2i, [
      f"--workdir={t2i_run}", "--num_prompts=10", f"--out={out}"]))
  written = json.loads(out.read_text())
  assert written == {k: v for k, v in result.items() if k != "json"}
  for key in ("colour_acc", "shape_acc", "score", "one_object"):
    assert 0.0 <= written[key] <= 1.0
  assert written["score"] <= min(written["colour_acc"], written["shape_acc"])
  assert written["n"] == 10 and len(written["per_prompt"]) == 10
  assert written["weights"] == "ema" and written["step"] == STEP
  assert written["batch_size"] == 16 and written["sample_steps"] == 2
  assert written["per_prompt"][1]["prompt"] == "a red square"
  grid = np.asarray(Image.open(written["grid"]))
  assert grid.shape == (64 + 2 + 64, 9 * 66 - 2, 3)  # 10 images, 9 per row


def test_random_init_baseline(t2i_run, tmp_path, parse_flags):
  result = eval_t2i.run_from_flags(parse_flags(eval_t2i, [
      f"--workdir={t2i_run}", "--num_prompts=10", "--random_init"]))
  assert result["weights"] == "random_init" and result["random_init"]
  assert result["json"].endswith("eval_t2i_random_init.json")
  # An untrained generator draws no recognisable object: far below the trained toy generator's
  # 0.91 (README), so the baseline says something.
  assert result["n"] == 10 and result["score"] < 0.2, result["score"]


def test_bad_inputs_are_named(t2i_run, monkeypatch):
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    eval_t2i.evaluate_t2i(t2i_run, num_prompts=4, batch_size=4)
  small = run_config(t2i_run)
  small.model.autoencoder.pixel_decoder.resolution = 32
  monkeypatch.setattr(eval_t2i, "run_config", lambda workdir: small)
  with pytest.raises(ValueError, match="needs at least 64 px"):
    eval_t2i.evaluate_t2i(t2i_run, num_prompts=8)
  small.task = "psvae"
  with pytest.raises(ValueError, match="evaluates text-to-image runs"):
    eval_t2i.evaluate_t2i(t2i_run, num_prompts=8)
