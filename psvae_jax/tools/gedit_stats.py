"""GEdit-Bench statistics from the scorer's CSV files, for English, Chinese or both.

  python -m psvae_jax.tools.gedit_stats --eval_dir=RESULTS/MODEL/gpt4o/eval_results_new \
      --model_name=MODEL [--languages=en,cn] [--out=stats.json]

GEdit-Bench's test_gedit_score.py writes one CSV per task group,
EVAL_DIR/<model_name>_<group>_gpt_score.csv, with a semantics and a quality score per edited
image (columns sementics_score, quality_score, intersection_exist, instruction_language). This
tool computes what the benchmark's calculate_statistics.py prints, for each language: per group
the mean semantics, quality and overall score (overall = sqrt(semantics * quality) per image),
over all images and over those with intersection_exist; then the plain mean of the group means
over the 11 groups (the benchmark's average) and over the 8 groups of --subtasks=paper
(psvae_jax.tools.gedit). calculate_statistics.py itself accepts only 'en' or 'zh' while the
records say 'cn'. A group without images of a language has no means; the averages that include
it are null and the group is named under 'empty_groups' (the official script prints NaN).
"""
from __future__ import annotations

import csv
import json
import math
import os

from absl import app, flags

from psvae_jax.tools.edit import InputError
from psvae_jax.tools.gedit import LANGUAGES, PAPER_SUBTASKS, TASK_TYPES

SCORES = ("semantics", "quality", "overall")
_TRUE, _FALSE = ("true", "1"), ("false", "0")


def read_scores(eval_dir: str, model_name: str) -> dict[str, list[dict]]:
  """group -> [{'language', 'intersection', 'semantics', 'quality', 'overall'}] per image."""
  out = {}
  for group in TASK_TYPES:
    path = os.path.join(eval_dir, f"{model_name}_{group}_gpt_score.csv")
    try:
      with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    except OSError as e:
      raise InputError(f"{path}: cannot read the scorer's CSV ({e.strerror or e}); "
                       "test_gedit_score.py writes one per task group") from None
    out[group] = [_image_scores(row, f"{path} row {n + 2}") for n, row in enumerate(rows)]
  return out


def _image_scores(row: dict, where: str) -> dict:
  try:
    semantics, quality = float(row["sementics_score"]), float(row["quality_score"])
    intersection = row["intersection_exist"].strip().lower()
    language = row["instruction_language"]
  except (KeyError, ValueError, AttributeError) as e:
    raise InputError(f"{where}: expected numeric sementics_score / quality_score, "
                     f"intersection_exist and instruction_language ({e!r})") from None
  if intersection not in _TRUE + _FALSE:
    raise InputError(f"{where}: intersection_exist={row['intersection_exist']!r} is not a bool")
  return {"language": language, "intersection": intersection in _TRUE, "semantics": semantics,
          "quality": quality, "overall": math.sqrt(semantics * quality)}


def _means(images: list[dict]) -> dict:
  if not images:
    return {"n": 0, **{s: None for s in SCORES}}
  return {"n": len(images), **{s: sum(i[s] for i in images) / len(images) for s in SCORES}}


def _average(per_group: dict, groups) -> dict:
  """Plain mean of the group means; None where a group has none."""
  return {s: (None if any(per_group[g][s] is None for g in groups)
              else sum(per_group[g][s] for g in groups) / len(groups)) for s in SCORES}


def statistics(scores: dict[str, list[dict]], language: str) -> dict:
  """Per-group means and the 11-group and paper-8 averages for one language."""
  result = {"language": language}
  for subset, keep in (("all", lambda i: True), ("intersection", lambda i: i["intersection"])):
    per_group = {g: _means([i for i in scores[g] if i["language"] == language and keep(i)])
                 for g in TASK_TYPES}
    result[subset] = {"groups": per_group, "average": _average(per_group, TASK_TYPES),
                      "average_paper_subtasks": _average(per_group, PAPER_SUBTASKS),
                      "empty_groups": [g for g in TASK_TYPES if per_group[g]["n"] == 0]}
  return result


def format_table(stats: dict) -> str:
  """The statistics as calculate_statistics.py prints them (semantics, quality, overall)."""
  fmt = lambda v: "nan" if v is None else f"{v:.3f}"
  lines = []
  for subset, title in (("all", ""), ("intersection", " intersection")):
    part = stats[subset]
    lines.append(f"[{stats['language']}{title}]")
    for name, values in (*part["groups"].items(), ("Average", part["average"]),
                         ("Average (paper subtasks)", part["average_paper_subtasks"])):
      lines.append(f"{name}: " + ", ".join(fmt(values[s]) for s in SCORES))
  return "\n".join(lines)


def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("eval_dir", None, "The scorer's output directory "
                      "(<save_path>/<model_name>/<backbone>/eval_results_new).", **f)
  flags.DEFINE_string("model_name", None, "The --model_name given to test_gedit_score.py.", **f)
  flags.DEFINE_list("languages", list(LANGUAGES), "Instruction languages to report.", **f)
  flags.DEFINE_string("out", None, "Also write the statistics as JSON here.", **f)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  v = flags.FLAGS
  for name in ("eval_dir", "model_name"):
    if v[name].value is None:
      raise app.UsageError(f"--{name} is required")
  unknown = [lang for lang in v.languages if lang not in LANGUAGES]
  if unknown or not v.languages:
    raise app.UsageError(f"--languages={v.languages}: expected some of {LANGUAGES}")
  try:
    scores = read_scores(v.eval_dir, v.model_name)
  except InputError as e:
    raise app.UsageError(str(e)) from None
  results = [statistics(scores, lang) for lang in v.languages]
  print("\n\n".join(format_table(r) for r in results))
  if v.out:
    with open(v.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
