"""Edits the GEdit-Bench images with a finished edit run, in the layout GEdit's scorers read.

  python -m psvae_jax.tools.gedit --workdir=DIR --bench=PATH --out=OUT_DIR \
      [--subtasks=paper|all|name,name] [--languages=en,cn] [--batch_size=8] [--fit=squash] \
      [--seed=0] [--cfg_scale=S] [--image_cfg_scale=S] [--steps=N] [--overwrite]

--bench is the user's copy of GEdit-Bench (Hugging Face dataset stepfun-ai/GEdit-Bench):
  a directory (searched recursively for *.parquet; without any, for *.jsonl / *.json), or one
  .parquet / .jsonl / .json file. Each record has
    key                   str, the sample id
    task_type             str, one of TASK_TYPES
    instruction           str
    instruction_language  str, 'en' or 'cn'
    input_image           parquet: the dataset's image struct {'bytes': binary, 'path': str}
                          (or plain binary); JSON: a file path, relative to the JSON's directory
  (other columns such as input_image_raw and Intersection_exist are not read).
Outputs: OUT_DIR/fullset/<task_type>/<instruction_language>/<key>.png (GEdit-Bench's own
evaluation layout), each at its input image's size (--fit=squash: the whole image is edited at
the run's square size and resized back), plus OUT_DIR/gedit_summary.json. Existing outputs are
kept (a rerun finishes an interrupted one) unless --overwrite.

Subtasks: PAPER.md reports EditReward on 8 GEdit-Bench subtasks without naming them.
**Decision:** `paper` = the 8 task types that OmniEdit's 7 edit types (object swap / removal /
addition, attribute modification, background swap, environment change, style transfer) cover:
background_change, color_alter, material_alter, style_change, subject-add, subject-remove,
subject-replace, tone_transfer; left out: motion_change, ps_human (portrait retouching) and
text_change (text rendering). `all` selects the 11.
"""
from __future__ import annotations

import base64
import collections
import glob
import json
import os
import time
from typing import Iterator

import numpy as np
from absl import app, flags

from psvae_jax.tools import cli, files
from psvae_jax.tools import edit as edit_tool

TASK_TYPES = ("background_change", "color_alter", "material_alter", "motion_change", "ps_human",
              "style_change", "subject-add", "subject-remove", "subject-replace", "text_change",
              "tone_transfer")
PAPER_SUBTASKS = ("background_change", "color_alter", "material_alter", "style_change",
                  "subject-add", "subject-remove", "subject-replace", "tone_transfer")
LANGUAGES = ("en", "cn")
COLUMNS = ("key", "task_type", "instruction", "instruction_language", "input_image")


def select_subtasks(spec: str) -> tuple[str, ...]:
  """'paper' | 'all' | comma-separated task types -> the task types."""
  if spec == "paper":
    return PAPER_SUBTASKS
  if spec == "all":
    return TASK_TYPES
  names = tuple(s.strip() for s in spec.split(",") if s.strip())
  unknown = [n for n in names if n not in TASK_TYPES]
  if unknown or not names:
    raise edit_tool.InputError(f"--subtasks={spec!r}: unknown task types {unknown}; expected "
                               f"'paper', 'all' or names from {TASK_TYPES}")
  return names


def bench_files(path: str) -> tuple[str, list[str]]:
  """('parquet' | 'json', files) of the benchmark at `path`."""
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if files:
      return "parquet", files
    files = sorted(glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True) +
                   glob.glob(os.path.join(path, "**", "*.json"), recursive=True))
    if files:
      return "json", files
    raise edit_tool.InputError(f"--bench={path!r}: no *.parquet, *.jsonl or *.json files in "
                               "the directory")
  if not os.path.isfile(path):
    raise edit_tool.InputError(f"--bench={path!r}: no such file or directory")
  if path.endswith(".parquet"):
    return "parquet", [path]
  if path.endswith((".json", ".jsonl")):
    return "json", [path]
  raise edit_tool.InputError(f"--bench={path!r}: expected a directory or a .parquet, .jsonl or "
                             ".json file")


def _image_bytes(value, where: str, base_dir: str | None) -> bytes:
  """Encoded image bytes of an input_image value (image struct, binary, base64 or a path)."""
  if isinstance(value, dict):
    if value.get("bytes"):
      value = value["bytes"]
    elif value.get("path"):
      value = value["path"]
    else:
      raise edit_tool.InputError(f"{where}: input_image struct has neither bytes nor path")
  if isinstance(value, (bytes, bytearray, memoryview)):
    return bytes(value)
  if isinstance(value, str) and base_dir is not None:
    path = value if os.path.isabs(value) else os.path.join(base_dir, value)
    try:
      with open(path, "rb") as f:
        return f.read()
    except OSError as e:
      raise edit_tool.InputError(f"{where}: cannot read input_image {path!r}: "
                                 f"{e.strerror or e}") from None
  if isinstance(value, str) and value.startswith("data:"):
    return base64.b64decode(value.split(",", 1)[1])
  raise edit_tool.InputError(f"{where}: unsupported input_image of type {type(value).__name__}")


def _check_record(record: dict, where: str) -> None:
  missing = [c for c in COLUMNS if record.get(c) in (None, "")]
  if missing:
    raise edit_tool.InputError(f"{where}: missing {missing} (a GEdit-Bench record needs "
                               f"{list(COLUMNS)})")


def _parquet_records(path: str, wanted) -> Iterator[dict]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  parquet = pq.ParquetFile(path)
  names = parquet.schema_arrow.names
  missing = [c for c in COLUMNS if c not in names]
  if missing:
    raise edit_tool.InputError(f"{path}: no columns {missing} (has {names}); expected the "
                               "GEdit-Bench layout")
  for batch in parquet.iter_batches(batch_size=16, columns=list(COLUMNS)):
    for row in batch.to_pylist():
      where = f"{path} key {row.get('key')!r}"
      _check_record(row, where)
      if wanted(row):
        row["input_image"] = _image_bytes(row["input_image"], where, None)
        yield row


def _json_records(path: str, wanted) -> Iterator[dict]:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    if path.endswith(".jsonl"):
      rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
      rows = json.loads(text)
  except ValueError as e:
    raise edit_tool.InputError(f"{path}: not valid JSON: {e}") from None
  if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
    raise edit_tool.InputError(f"{path}: expected a list of records (objects)")
  for n, row in enumerate(rows):
    where = f"{path} record {n}"
    _check_record(row, where)
    if wanted(row):
      row = dict(row, input_image=_image_bytes(row["input_image"], where,
                                               os.path.dirname(os.path.abspath(path))))
      yield row


def read_bench(path: str, subtasks, languages) -> list[dict]:
  """The benchmark records of the selected task types and languages (images as bytes)."""
  kind, files = bench_files(path)
  wanted = lambda r: r.get("task_type") in subtasks and r.get("instruction_language") in languages
  reader = _parquet_records if kind == "parquet" else _json_records
  records = [r for f in files for r in reader(f, wanted)]
  keys = collections.Counter((r["task_type"], r["instruction_language"], str(r["key"]))
                             for r in records)
  dup = [k for k, n in keys.items() if n > 1]
  if dup:
    raise edit_tool.InputError(f"--bench={path!r}: duplicate (task_type, language, key) "
                               f"entries, e.g. {dup[:3]}")
  return records


def output_path(out: str, record: dict) -> str:
  """OUT/fullset/<task_type>/<language>/<key>.png."""
  return os.path.join(out, "fullset", record["task_type"], record["instruction_language"],
                      f"{record['key']}.png")


def run_gedit(workdir: str, bench: str, out: str, *, subtasks: str = "paper",
              languages=LANGUAGES, batch_size: int = 8, fit: str = "squash", seed: int = 0,
              overwrite: bool = False, **sampling) -> dict:
  """Edits the selected benchmark records; returns (and writes) the summary."""
  start = time.time()
  tasks = select_subtasks(subtasks)
  bad_lang = [lang for lang in languages if lang not in LANGUAGES]
  if bad_lang or not languages:
    raise edit_tool.InputError(f"--languages={list(languages)}: expected some of {LANGUAGES}")
  if fit not in edit_tool.FITS:
    raise edit_tool.InputError(f"--fit={fit!r}: expected one of {edit_tool.FITS}")
  records = read_bench(bench, tasks, tuple(languages))
  if not records:
    raise edit_tool.InputError(f"--bench={bench!r}: no records of task types {list(tasks)} in "
                               f"languages {list(languages)}")
  todo = [r for r in records if overwrite or not os.path.exists(output_path(out, r))]
  task, model, config, extras = edit_tool.load_edit_run(workdir)
  for i in range(0, len(todo), batch_size):
    part = todo[i:i + batch_size]
    # Decoded a batch at a time: the benchmark's photos would not all fit in memory decoded.
    images = [edit_tool.decode_input_image(
        r["input_image"], f"key {r['key']!r} ({r['task_type']}/{r['instruction_language']})")
              for r in part]
    edited = edit_tool.edit_pil_images(
        task, model, images, [r["instruction"] for r in part], fit=fit,
        seed=seed + i // batch_size, batch_size=batch_size, **sampling)
    for record, image in zip(part, edited):
      path = output_path(out, record)
      files.write_png(path, np.asarray(image))
  counts = collections.Counter(f"{r['task_type']}/{r['instruction_language']}" for r in records)
  summary = {"workdir": workdir, "step": extras["step"], "bench": bench,
             "out": os.path.join(out, "fullset"),
             "subtasks": list(tasks), "languages": list(languages), "records": len(records),
             "edited": len(todo), "kept_existing": len(records) - len(todo),
             "per_subtask": dict(sorted(counts.items())), "fit": fit, "seed": seed,
             "model_size": config.data.image_size,
             **edit_tool.sampling_used(config, sampling),
             "seconds": round(time.time() - start, 1)}
  files.write_json(os.path.join(out, "gedit_summary.json"), summary)
  return summary


def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The edit run's directory (with checkpoints/).", **f)
  flags.DEFINE_string("bench", None, "GEdit-Bench: directory or .parquet / .jsonl / .json.", **f)
  flags.DEFINE_string("out", None, "Output directory (fullset/<task>/<lang>/<key>.png).", **f)
  flags.DEFINE_string("subtasks", "paper", "'paper' (8), 'all' (11) or task types, "
                      "comma-separated.", **f)
  flags.DEFINE_list("languages", list(LANGUAGES), "Instruction languages to edit.", **f)
  flags.DEFINE_integer("batch_size", 8, "Images per batch.", **f)
  flags.DEFINE_enum("fit", "squash", list(edit_tool.FITS), "How images meet the run's square "
                    "size (see psvae_jax.tools.edit).", **f)
  edit_tool.define_sampling_flags(flag_values, seed_help="Noise seed.")
  flags.DEFINE_bool("overwrite", False, "Re-edit records whose output exists.", **f)


def main(argv):
  cli.no_arguments(argv)
  v = flags.FLAGS
  cli.require_flags(v, "workdir", "bench", "out")
  try:
    summary = run_gedit(v.workdir, v.bench, v.out, subtasks=v.subtasks, languages=v.languages,
                        batch_size=v.batch_size, fit=v.fit, seed=v.seed, overwrite=v.overwrite,
                        **edit_tool.sampling_overrides(v.cfg_scale, v.image_cfg_scale, v.steps))
  except edit_tool.InputError as e:
    raise app.UsageError(str(e)) from None
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
