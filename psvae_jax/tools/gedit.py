"""Edits the GEdit-Bench images with a finished edit run, in the layout GEdit's scorer reads.

  python -m psvae_jax.tools.gedit --workdir=DIR --bench=PATH --out=RESULTS/MODEL_NAME \
      [--subtasks=all|paper|name,name] [--languages=en,cn] [--batch_size=8] [--fit=squash] \
      [--seed=0] [--cfg_scale=S] [--image_cfg_scale=S] [--steps=N] [--overwrite]

--bench is the user's copy of GEdit-Bench (Hugging Face dataset stepfun-ai/GEdit-Bench): a
`datasets` save_to_disk folder (state.json, dataset_info.json, data-*.arrow; a DatasetDict's
folder with its split folders works too), a folder of the hub's *.parquet files, a folder of
*.jsonl / *.json files, or one .parquet / .arrow / .jsonl / .json file. Each record has
    key                   str, the sample id
    task_type             str, one of TASK_TYPES
    instruction           str
    instruction_language  str, 'en' or 'cn'
    input_image           arrow / parquet: the dataset's image struct {'bytes': binary,
                          'path': str} (or plain binary); JSON: a file path, relative to the
                          JSON's directory
  (other columns such as input_image_raw and Intersection_exist are not read).
Outputs, the layout of GEdit-Bench's generate_image_example.py that its test_gedit_score.py
reads: OUT/fullset/<task_type>/<instruction_language>/<key>.png, the edited image at its input
image's size (--fit=squash: the whole image is edited at the run's square size and resized
back), and <key>_SRCIMG.png beside it, the record's input_image (the scorer skips a record
unless both exist). Each file is written under a hidden temporary name and renamed, so an
interrupted run never leaves a truncated PNG; a rerun keeps the records whose two files exist
(so it finishes an interrupted run) unless --overwrite. OUT/gedit_summary.json: settings
and counts. The scorer reads <save_path>/<model_name>/fullset, so OUT is
<save_path>/<model_name>.

Scoring, with GEdit-Bench's scripts (Step1X-Edit repository, GEdit-Bench/):
  python test_gedit_score.py --model_name MODEL_NAME --save_path RESULTS --backbone gpt4o
  python -m psvae_jax.tools.gedit_stats \
      --eval_dir=RESULTS/MODEL_NAME/gpt4o/eval_results_new --model_name=MODEL_NAME
Two faults of the official scripts as published: test_gedit_score.py iterates the DatasetDict
that load_dataset returns (its split names, not its records), so it fails until the loop reads
dataset['train'] as generate_image_example.py does; calculate_statistics.py accepts only
--language en or zh while the records say 'cn', so it cannot report the Chinese half.
`psvae_jax.tools.gedit_stats` computes the same statistics from the scorer's CSV files for
'en', 'cn' or both.

Subtasks: the paper reports EditReward on 8 GEdit-Bench subtasks without naming them
(docs/method.md#editing). `paper` = the 8 task types that OmniEdit's 7 edit types (object swap /
removal / addition, attribute modification, background swap, environment change, style
transfer) cover: background_change, color_alter, material_alter, style_change, subject-add,
subject-remove, subject-replace, tone_transfer; left out: motion_change, ps_human (portrait
retouching) and text_change (text rendering). The default is `all` (11): GEdit-Bench's
statistics average over all 11 groups, and a group without images makes that average NaN.
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
SOURCE_SUFFIX = "_SRCIMG"  # <key>_SRCIMG.png: the source image the scorer shows its judge
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
  """('parquet' | 'arrow' | 'json', files) of the benchmark at `path`."""
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if files:
      return "parquet", files
    states = sorted(glob.glob(os.path.join(path, "**", "state.json"), recursive=True))
    if states:
      return "arrow", [f for state in states for f in saved_dataset_files(state)]
    files = sorted(glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True) +
                   glob.glob(os.path.join(path, "**", "*.json"), recursive=True))
    if files:
      return "json", files
    raise edit_tool.InputError(f"--bench={path!r}: no *.parquet files, `datasets` save_to_disk "
                               "folder (state.json) or *.jsonl / *.json files in the directory")
  if not os.path.isfile(path):
    raise edit_tool.InputError(f"--bench={path!r}: no such file or directory")
  if path.endswith(".parquet"):
    return "parquet", [path]
  if path.endswith(".arrow"):
    return "arrow", [path]
  if path.endswith((".json", ".jsonl")):
    return "json", [path]
  raise edit_tool.InputError(f"--bench={path!r}: expected a directory or a .parquet, .arrow, "
                             ".jsonl or .json file")


def saved_dataset_files(state_json: str) -> list[str]:
  """The data-*.arrow files of a `datasets` save_to_disk folder, as its state.json lists them."""
  try:
    with open(state_json, encoding="utf-8") as f:
      names = [entry["filename"] for entry in json.load(f)["_data_files"]]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise edit_tool.InputError(f"{state_json}: not a `datasets` save_to_disk state "
                               f"(no readable _data_files list: {e})") from None
  files = [os.path.join(os.path.dirname(state_json), name) for name in names]
  missing = [f for f in files if not os.path.isfile(f)]
  if missing or not files:
    raise edit_tool.InputError(f"{state_json}: lists data files {names}, missing {missing}")
  return files


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


def _check_columns(path: str, names) -> None:
  missing = [c for c in COLUMNS if c not in names]
  if missing:
    raise edit_tool.InputError(f"{path}: no columns {missing} (has {names}); expected the "
                               "GEdit-Bench layout")


def _parquet_records(path: str, wanted) -> Iterator[dict]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  parquet = pq.ParquetFile(path)
  _check_columns(path, parquet.schema_arrow.names)
  yield from _table_records(path, parquet.iter_batches(batch_size=16, columns=list(COLUMNS)),
                            wanted)


def _arrow_records(path: str, wanted) -> Iterator[dict]:
  """Records of an Arrow IPC file: the stream format `datasets` writes, or the file format."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top

  with open(path, "rb") as f:
    is_file_format = f.read(6) == b"ARROW1"
  try:
    with pa.memory_map(path) as source:
      reader = (pa.ipc.open_file(source) if is_file_format else pa.ipc.open_stream(source))
      _check_columns(path, reader.schema.names)
      batches = ([reader.get_batch(i) for i in range(reader.num_record_batches)]
                 if is_file_format else reader)
      yield from _table_records(path, (b.select(list(COLUMNS)) for b in batches), wanted)
  except pa.ArrowInvalid as e:
    raise edit_tool.InputError(f"{path}: not a readable Arrow file: {e}") from None


def _table_records(path: str, batches, wanted) -> Iterator[dict]:
  for batch in batches:
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
  reader = {"parquet": _parquet_records, "arrow": _arrow_records, "json": _json_records}[kind]
  records = [r for f in files for r in reader(f, wanted)]
  keys = collections.Counter((r["task_type"], r["instruction_language"], str(r["key"]))
                             for r in records)
  dup = [k for k, n in keys.items() if n > 1]
  if dup:
    raise edit_tool.InputError(f"--bench={path!r}: duplicate (task_type, language, key) "
                               f"entries, e.g. {dup[:3]}")
  return records


def output_path(out: str, record: dict, suffix: str = "") -> str:
  """OUT/fullset/<task_type>/<language>/<key><suffix>.png (suffix '_SRCIMG': the source)."""
  return os.path.join(out, "fullset", record["task_type"], record["instruction_language"],
                      f"{record['key']}{suffix}.png")


def _finished(out: str, record: dict) -> bool:
  return all(os.path.isfile(output_path(out, record, s)) for s in ("", SOURCE_SUFFIX))


def run_gedit(workdir: str, bench: str, out: str, *, subtasks: str = "all",
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
  todo = [r for r in records if overwrite or not _finished(out, r)]
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
    for record, source, image in zip(part, images, edited):
      files.write_png(output_path(out, record, SOURCE_SUFFIX), np.asarray(source))
      files.write_png(output_path(out, record), np.asarray(image))
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
  flags.DEFINE_string("bench", None, "GEdit-Bench: a save_to_disk folder, a directory of "
                      "parquet / JSON files, or one .parquet / .arrow / .jsonl / .json.", **f)
  flags.DEFINE_string("out", None, "Output directory, <save_path>/<model_name> of the scorer "
                      "(fullset/<task>/<lang>/<key>.png and <key>_SRCIMG.png).", **f)
  flags.DEFINE_string("subtasks", "all", "'all' (11, what GEdit-Bench's statistics average), "
                      "'paper' (8) or task types, comma-separated.", **f)
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
