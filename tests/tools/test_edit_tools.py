"""The edit tools on a tiny edit run: one image, a generated GEdit-Bench copy, the synthetic
edit evaluation (and its scoring on known images)."""
import importlib
import io
import json

import numpy as np
import pytest
from absl import flags
from PIL import Image

from psvae_jax.data import synthetic
from psvae_jax.tools import edit as edit_tool
from psvae_jax.tools import eval_edit, gedit

from helpers.configs import tiny_edit_config
from helpers.runs import write_run


@pytest.fixture(scope="module")
def edit_run(tmp_path_factory):
  """A fake finished edit run (random weights) with 2-step sampling at 32 px."""
  workdir = str(tmp_path_factory.mktemp("edit_run"))
  write_run(workdir, tiny_edit_config(), step=3)
  return workdir


def _png(size, colour=(200, 30, 30)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, colour).save(buffer, format="PNG")
  return buffer.getvalue()


def test_edit_one_image(edit_run, tmp_path):
  image = tmp_path / "in.png"
  image.write_bytes(_png((40, 24)))
  out = tmp_path / "out" / "edited.png"
  result = edit_tool.edit_file(edit_run, str(image), "make it blue", str(out), num_steps=1)
  # (Single images run in batches of 1, as the GEdit test below, so compiles are shared.)
  assert Image.open(out).size == (40, 24)  # squash: back at the input's size
  assert result["step"] == 3 and result["model_size"] == 32 and result["steps"] == 1
  crop = edit_tool.edit_file(edit_run, str(image), "make it blue", str(tmp_path / "c.png"),
                             fit="crop", num_steps=1)
  assert crop["size"] == [32, 32]
  # Unusable inputs are named with the reason, before any model is loaded.
  bad = tmp_path / "notes.png"
  bad.write_text("not an image")
  with pytest.raises(edit_tool.InputError, match="notes.png.*not a readable image"):
    edit_tool.edit_file(edit_run, str(bad), "x", str(out))
  with pytest.raises(edit_tool.InputError, match="cannot read the image file.*missing.png"):
    edit_tool.edit_file(edit_run, str(tmp_path / "missing.png"), "x", str(out))


def test_flags_parse():
  values = flags.FlagValues()
  gedit.define_flags(values)
  values(["gedit", "--workdir=W", "--bench=B", "--out=O", "--languages=en"])
  assert values.subtasks == "all" and values.languages == ["en"]
  assert gedit.select_subtasks("paper") == gedit.PAPER_SUBTASKS and len(gedit.PAPER_SUBTASKS) == 8
  with pytest.raises(edit_tool.InputError, match="unknown task types \\['bogus'\\]"):
    gedit.select_subtasks("color_alter,bogus")


@pytest.mark.parametrize("tool", ["edit", "gedit", "eval_edit"])
def test_sampling_flags_shared(tool):
  """The three editing tools take the same sampling flags (unset = the run's settings)."""
  module = importlib.import_module(f"psvae_jax.tools.{tool}")
  values = flags.FlagValues()
  module.define_flags(values)
  values([tool, "--seed=3", "--cfg_scale=2", "--steps=7"])
  assert (values.seed, values.cfg_scale, values.image_cfg_scale, values.steps) == (3, 2.0, None, 7)
  assert edit_tool.sampling_overrides(values.cfg_scale, values.image_cfg_scale, values.steps) == {
      "text_scale": 2.0, "image_scale": None, "num_steps": 7}


def test_gedit_layout(edit_run, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = [("k1", "color_alter", "en", (48, 32)), ("k2", "subject-add", "cn", (32, 32)),
          ("k3", "text_change", "en", (32, 32)), ("k4", "motion_change", "cn", (32, 40))]
  table = pa.table({
      "key": [r[0] for r in rows], "task_type": [r[1] for r in rows],
      "instruction": ["make it blue"] * 4, "instruction_language": [r[2] for r in rows],
      "input_image": [{"bytes": _png(r[3]), "path": f"{r[0]}.png"} for r in rows],
      "input_image_raw": [{"bytes": _png(r[3]), "path": None} for r in rows]})
  bench = tmp_path / "GEdit-Bench" / "data"
  bench.mkdir(parents=True)
  pq.write_table(table, bench / "train-00000-of-00001.parquet")
  out = tmp_path / "gedit_out"
  summary = gedit.run_gedit(edit_run, str(bench.parent), str(out), subtasks="paper",
                            num_steps=1, batch_size=1)
  # The paper's 8 subtasks: text_change and motion_change are left out.
  assert summary["records"] == summary["edited"] == 2
  assert Image.open(out / "fullset" / "color_alter" / "en" / "k1.png").size == (48, 32)
  # Beside each edit, the source image the scorer opens with it: the record's input_image.
  source = Image.open(out / "fullset" / "color_alter" / "en" / "k1_SRCIMG.png")
  np.testing.assert_array_equal(np.asarray(source), np.asarray(Image.open(io.BytesIO(
      _png((48, 32))))))
  assert Image.open(out / "fullset" / "subject-add" / "cn" / "k2.png").size == (32, 32)
  assert sorted(p.name for p in (out / "fullset").iterdir()) == ["color_alter", "subject-add"]
  assert json.loads((out / "gedit_summary.json").read_text())["per_subtask"] == {
      "color_alter/en": 1, "subject-add/cn": 1}
  # A rerun keeps finished outputs; by default it covers all 11 task types.
  again = gedit.run_gedit(edit_run, str(bench.parent), str(out), languages=["en"],
                          num_steps=1, batch_size=1)
  assert again["records"] == 2 and again["edited"] == 1 and again["kept_existing"] == 1
  assert (out / "fullset" / "text_change" / "en" / "k3.png").is_file()
  assert (out / "fullset" / "text_change" / "en" / "k3_SRCIMG.png").is_file()


def test_gedit_json_copies(tmp_path):
  (tmp_path / "img.png").write_bytes(_png((32, 32)))
  jsonl = tmp_path / "bench.jsonl"
  record = {"key": "j1", "task_type": "style_change", "instruction": "x",
            "instruction_language": "en", "input_image": "img.png"}
  jsonl.write_text(json.dumps(record) + "\n")
  (read,) = gedit.read_bench(str(jsonl), gedit.PAPER_SUBTASKS, ("en",))
  assert read["input_image"] == _png((32, 32)) and read["key"] == "j1"
  assert gedit.read_bench(str(jsonl), gedit.PAPER_SUBTASKS, ("cn",)) == []
  jsonl.write_text(json.dumps({"key": "j2", "task_type": "style_change"}) + "\n")
  with pytest.raises(edit_tool.InputError, match=r"missing \['instruction', "):
    gedit.read_bench(str(jsonl), gedit.PAPER_SUBTASKS, ("en",))
  with pytest.raises(edit_tool.InputError, match="no such file or directory"):
    gedit.read_bench(str(tmp_path / "nope"), gedit.PAPER_SUBTASKS, ("en",))


def test_scoring_on_known_images():
  size = 64
  edits = eval_edit.held_out_edits(3, size, start=100_000)
  assert sorted({e["kind"] for e in edits}) == sorted(synthetic.EDIT_KINDS) and len(edits) == 12
  for e in edits:
    # The true target follows every edit and keeps everything outside the mask exactly.
    assert eval_edit.edit_followed(e["target"], e["source_scene"], e["target_scene"]), e
    assert eval_edit.psnr_outside(e["target"], e["source"], e["mask"]) == eval_edit.PSNR_CAP
    assert not eval_edit.edit_followed(e["source"], e["source_scene"], e["target_scene"]), e
  table = eval_edit.score(edits, np.stack([e["target"] for e in edits]), 20.0)
  assert all(table[k]["success"] == 1.0 for k in (*synthetic.EDIT_KINDS, "all"))
  noise = np.random.default_rng(0).integers(0, 256, (12, size, size, 3), dtype=np.uint8)
  assert eval_edit.score(edits, noise, 20.0)["all"]["preserved"] == 0.0


def test_eval_edit(edit_run, tmp_path):
  out = tmp_path / "eval" / "edit.json"
  result = eval_edit.evaluate_edits(edit_run, num=2, random_init=True, out=str(out),
                                    num_steps=1, batch_size=1)
  assert json.loads(out.read_text()) == result
  rows = result["rows"]
  assert set(rows) == {"trained", "source_identity", "reconstruction", "random_init"}
  identity = rows["source_identity"]
  for kind in synthetic.EDIT_KINDS:
    assert identity[kind]["n"] == 2
    assert identity[kind]["preserved"] == 1.0 and identity[kind]["success"] == 0.0
  assert result["step"] == 3 and result["steps"] == 1
  assert (tmp_path / "eval" / "edit_grid.png").is_file()
  assert "source_identity" in eval_edit.format_table(result)
