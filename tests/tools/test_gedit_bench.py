"""GEdit-Bench harness without a model: reading the published dataset layouts, the files the
official scorer needs, interrupted writes, and the statistics over the scorer's CSV files."""
import csv
import io
import json
import math
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from psvae_jax.tools import files, gedit, gedit_stats
from psvae_jax.tools.edit import InputError


def _png(size, colour=(200, 30, 30)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, colour).save(buffer, format="PNG")
  return buffer.getvalue()


def _table(rows) -> pa.Table:
  """GEdit-Bench's columns (image structs as `datasets` stores them) for (key, task, lang)."""
  image = lambda key: {"bytes": _png((24, 16)), "path": f"{key}.png"}
  return pa.table({
      "task_type": [r[1] for r in rows], "key": [r[0] for r in rows],
      "instruction": ["make it blue"] * len(rows), "instruction_language": [r[2] for r in rows],
      "input_image": [image(r[0]) for r in rows], "input_image_raw": [image(r[0]) for r in rows],
      "Intersection_exist": [True] * len(rows)})


def _save_to_disk(folder, table: pa.Table, shards: int = 2) -> None:
  """What datasets' DatasetDict.save_to_disk writes: dataset_dict.json and a split folder of
  Arrow IPC stream files listed in state.json, beside dataset_info.json."""
  split = folder / "train"
  split.mkdir(parents=True)
  (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
  (split / "dataset_info.json").write_text(json.dumps({"features": {}, "splits": {}}))
  names, step = [], -(-table.num_rows // shards)
  for i in range(shards):
    names.append(f"data-{i:05d}-of-{shards:05d}.arrow")
    with pa.OSFile(str(split / names[-1]), "wb") as sink:
      with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.slice(i * step, step))
  (split / "state.json").write_text(json.dumps(
      {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_split": "train"}))


ROWS = [("k1", "color_alter", "en"), ("k2", "subject-add", "cn"), ("k3", "text_change", "en")]


def test_reads_a_save_to_disk_folder(tmp_path):
  _save_to_disk(tmp_path / "GEdit-Bench", _table(ROWS))
  records = gedit.read_bench(str(tmp_path / "GEdit-Bench"), gedit.TASK_TYPES, gedit.LANGUAGES)
  assert [(r["key"], r["task_type"], r["instruction_language"]) for r in records] == ROWS
  assert all(r["input_image"] == _png((24, 16)) for r in records)
  # The split folder alone, and one .arrow file, read the same.
  assert len(gedit.read_bench(str(tmp_path / "GEdit-Bench" / "train"), gedit.PAPER_SUBTASKS,
                              ("en", "cn"))) == 2
  one = tmp_path / "GEdit-Bench" / "train" / "data-00001-of-00002.arrow"
  assert [r["key"] for r in gedit.read_bench(str(one), gedit.TASK_TYPES, ("en",))] == ["k3"]


def test_arrow_file_format_and_damaged_folders(tmp_path):
  path = tmp_path / "bench.arrow"
  with pa.OSFile(str(path), "wb") as sink:
    with pa.ipc.new_file(sink, _table(ROWS).schema) as writer:
      writer.write_table(_table(ROWS))
  assert len(gedit.read_bench(str(path), gedit.TASK_TYPES, gedit.LANGUAGES)) == 3
  folder = tmp_path / "broken"
  _save_to_disk(folder, _table(ROWS), shards=1)
  os.remove(folder / "train" / "data-00000-of-00001.arrow")
  with pytest.raises(InputError, match="state.json: lists data files.*missing"):
    gedit.read_bench(str(folder), gedit.TASK_TYPES, gedit.LANGUAGES)
  (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
  with pytest.raises(InputError, match="junk.arrow: not a readable Arrow file"):
    gedit.read_bench(str(tmp_path / "junk.arrow"), gedit.TASK_TYPES, gedit.LANGUAGES)
  narrow = tmp_path / "narrow"
  _save_to_disk(narrow, _table(ROWS).drop_columns(["instruction"]), shards=1)
  with pytest.raises(InputError, match=r"no columns \['instruction'\]"):
    gedit.read_bench(str(narrow), gedit.TASK_TYPES, gedit.LANGUAGES)


def test_a_record_is_finished_only_with_both_files(tmp_path):
  record = {"key": "k1", "task_type": "color_alter", "instruction_language": "en"}
  assert gedit.output_path(str(tmp_path), record, gedit.SOURCE_SUFFIX).endswith(
      os.path.join("fullset", "color_alter", "en", "k1_SRCIMG.png"))
  image = np.zeros((8, 8, 3), np.uint8)
  files.write_png(gedit.output_path(str(tmp_path), record), image)
  assert not gedit._finished(str(tmp_path), record)
  files.write_png(gedit.output_path(str(tmp_path), record, gedit.SOURCE_SUFFIX), image)
  assert gedit._finished(str(tmp_path), record)


def _write_scorer_csvs(folder, model, rows_by_group) -> None:
  fields = ["source_image", "edited_image", "instruction", "sementics_score", "quality_score",
            "intersection_exist", "instruction_language"]
  for group in gedit.TASK_TYPES:
    with open(folder / f"{model}_{group}_gpt_score.csv", "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=fields)
      writer.writeheader()
      for semantics, quality, intersection, language in rows_by_group.get(group, []):
        writer.writerow({"source_image": "s.png", "edited_image": "e.png", "instruction": "x",
                         "sementics_score": semantics, "quality_score": quality,
                         "intersection_exist": intersection, "instruction_language": language})


def test_statistics_of_the_scorer_csvs(tmp_path):
  rows = {g: [(8, 2, True, "en"), (4, 4, False, "en"), (9, 1, True, "cn")]
          for g in gedit.TASK_TYPES}
  rows["text_change"] = [(6, 6, False, "en")]  # no Chinese images, none in the intersection
  _write_scorer_csvs(tmp_path, "m", rows)
  scores = gedit_stats.read_scores(str(tmp_path), "m")
  en = gedit_stats.statistics(scores, "en")
  color = en["all"]["groups"]["color_alter"]
  assert color["n"] == 2 and color["semantics"] == 6.0 and color["quality"] == 3.0
  assert color["overall"] == pytest.approx(4.0)  # mean of sqrt(8 * 2) and sqrt(4 * 4)
  assert en["all"]["average"]["overall"] == pytest.approx((10 * 4.0 + 6.0) / 11)
  assert en["all"]["average_paper_subtasks"]["overall"] == pytest.approx(4.0)
  assert en["intersection"]["groups"]["color_alter"]["overall"] == pytest.approx(4.0)
  assert en["intersection"]["empty_groups"] == ["text_change"]
  assert en["intersection"]["average"]["overall"] is None  # the official script prints nan
  cn = gedit_stats.statistics(scores, "cn")
  assert cn["all"]["groups"]["color_alter"]["overall"] == pytest.approx(3.0)
  assert cn["all"]["empty_groups"] == ["text_change"] and cn["all"]["average"]["quality"] is None
  assert cn["all"]["average_paper_subtasks"]["overall"] == pytest.approx(3.0)
  table = gedit_stats.format_table(cn)
  assert "text_change: nan, nan, nan" in table and "color_alter: 9.000, 1.000, 3.000" in table
  assert math.isclose(json.loads(json.dumps(en))["all"]["groups"]["ps_human"]["semantics"], 6.0)


def test_statistics_name_bad_csvs(tmp_path):
  with pytest.raises(InputError, match="m_background_change_gpt_score.csv: cannot read"):
    gedit_stats.read_scores(str(tmp_path), "m")
  _write_scorer_csvs(tmp_path, "m", {"color_alter": [("high", 2, True, "en")]})
  with pytest.raises(InputError, match="m_color_alter_gpt_score.csv row 2: expected numeric"):
    gedit_stats.read_scores(str(tmp_path), "m")
  _write_scorer_csvs(tmp_path, "m", {"color_alter": [(1, 2, "maybe", "en")]})
  with pytest.raises(InputError, match="intersection_exist='maybe' is not a bool"):
    gedit_stats.read_scores(str(tmp_path), "m")
