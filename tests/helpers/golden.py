"""Golden checkpoints: one small finished run of each stage, committed under tests/data/golden.

Each stage's smoke config shrunk to the smallest shapes that still build its whole model
(`micro` encoder, text encoder and MMDiT presets, 8 px images), trained STEPS steps, each stage
initialised from the previous one as a user chains them. Next to each checkpoint, `golden.json`
records the config overrides and the metrics (loss, its terms, gradient norm) of the
RESUMED_STEPS training steps after the run is resumed from it. tests/test_golden_checkpoints.py
restores every stage from its committed checkpoint and compares: a change that no longer
restores a checkpoint written by earlier code, or trains on differently from it, fails there.

Regenerate only when a change deliberately breaks old checkpoints or changes the training step
(and say so in the commit), never to silence a failure nobody explained:
  python -m tests.helpers.golden --write

Every array and metric is deterministic (seeded init and data, one CPU device, the test suite's
XLA flags); Orbax's own files record timestamps and the directory they were written in, so a
rewrite changes those files and the checksum manifests. The runs are trained in a scratch
directory with each parent named by its relative directory ('svae', ...): the stored configs
hold no absolute path, and nothing that restores them reads one.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
  # The test session's environment (tests/conftest.py), set before jax is imported: the stored
  # metrics are computed as the test computes them.
  os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8"
                             " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true")
  os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

from psvae_jax import train  # noqa: E402
from psvae_jax.config_loader import load_config  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN_DIR = os.path.join(REPO_ROOT, "tests", "data", "golden")
RECORD = "golden.json"
STAGES = ("svae", "psvae", "t2i", "edit")
PARENTS = {"psvae": "svae", "t2i": "psvae", "edit": "t2i"}
STEPS = 20
# Steps trained after restoring: the first one's metrics check the restored parameters, data
# position and step; the second one's the optimizer state as well.
RESUMED_STEPS = 2
# Logged scalars that measure the machine, not the step: not recorded.
_TIMING_PREFIXES = ("perf/", "progress/")

_RUN = {
    "batch_size": 4, "log_every": 1, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0,
    "data.image_size": 8, "data.min_image_size": 8, "data.synthetic_size": 64,
    "data.eval_size": 8,
    "logging.tensorboard": False, "logging.peak_flops_per_device": 1e12,
}
_AUTOENCODER = {
    **_RUN,
    "model.encoder": "micro", "model.encoder_resolution": 8,  # 4x4 tokens
    "model.svae_depth": 1, "model.latent_channels": 4,
    # 4x4 -> 8x8 px; two widths, so that a ResNet block has its channel-changing shortcut.
    "model.pixel_decoder.ch": 4, "model.pixel_decoder.ch_mult": (1, 2),
    "model.pixel_decoder.num_res_blocks": 0, "model.pixel_decoder.attn_resolutions": (),
    "model.pixel_decoder.resolution": 8, "model.pixel_decoder.norm_groups": 4,
    "model.discriminator.ndf": 4, "model.discriminator.n_layers": 1,
    # Orbax stores some 1.4 kB of metadata per array: only the T2I run keeps an EMA item.
    "optim.ema_decay": 0.0,
}
_GENERATOR = {
    **_RUN,
    "model.generator": "micro", "model.text_encoder": "micro", "model.max_text_len": 32,
    "flow.sample_steps": 1, "flow.num_samples": 2,
    # The MMDiT's outputs start at zero: at the smoke rate its weights would still hardly move
    # the loss after STEPS steps.
    "optim.lr": 1e-2,
}
# config.init and config.total_steps are set per run (the parent's directory; STEPS, then
# STEPS + RESUMED_STEPS when resumed).
OVERRIDES = {
    "svae": _AUTOENCODER,
    "psvae": {**_AUTOENCODER, "loss.disc_start": 1, "latent_stats_batches": 1},
    "t2i": _GENERATOR,
    "edit": {**_GENERATOR, "model.edit_position_std": 0.5, "optim.ema_decay": 0.0},
}


def config_spec(stage: str) -> str:
  return f"configs/{stage}.py:smoke"


def cli_flags(overrides: dict) -> list[str]:
  """The overrides as `--config.key=value` flags of `python -m psvae_jax.main`."""
  def text(value):
    if isinstance(value, (list, tuple)):
      return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)
  return [f"--config.{key}={text(value)}" for key, value in overrides.items()]


def run_stage(stage: str, overrides: dict, root: str, total_steps: int) -> dict:
  """Trains (or resumes) `stage` in ROOT/<stage> to `total_steps` on one CPU device, its
  config.init the parent stage's directory ROOT/<parent>; returns the loop's summary."""
  parent = PARENTS.get(stage)
  config = load_config(config_spec(stage), {
      **overrides, "total_steps": total_steps,
      "init": os.path.join(root, parent) if parent else ""})
  return train.train(config, os.path.join(root, stage), devices=jax.devices()[:1])


def read_record(stage_dir: str) -> dict:
  with open(os.path.join(stage_dir, RECORD)) as f:
    return json.load(f)


def copy_golden(root: str, source: str = GOLDEN_DIR) -> None:
  """Copies every stage's golden run to ROOT/<stage> (resuming writes into the run)."""
  for stage in STAGES:
    shutil.copytree(os.path.join(source, stage), os.path.join(root, stage))


def resume(stage: str, root: str) -> tuple[dict, dict[str, dict[str, float]]]:
  """Resumes the golden run copied to ROOT/<stage> (parents beside it) through the training
  loop for RESUMED_STEPS steps. Returns the loop's summary and {step: {metric: value}} of those
  steps (the loss, its terms, the gradient norm, ... from the run's metrics.jsonl; no timings).
  Raises if the loop did not continue from the golden step."""
  record = read_record(os.path.join(root, stage))
  summary = run_stage(stage, record["overrides"], root, record["step"] + RESUMED_STEPS)
  expected = f"workdir step {record['step']}"
  if summary.get("source") != expected:
    raise RuntimeError(f"{stage}: the run started from {summary.get('source')!r}, not from its "
                       f"golden checkpoint ({expected})")
  with open(os.path.join(root, stage, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  metrics = {}
  for row in rows:
    step = row.pop("step")
    if step > record["step"]:
      metrics[str(step)] = {k: v for k, v in row.items() if not k.startswith(_TIMING_PREFIXES)}
  return summary, metrics


@contextlib.contextmanager
def _working_directory(path: str):
  previous = os.getcwd()
  os.chdir(path)
  try:
    yield
  finally:
    os.chdir(previous)


def _versions() -> dict:
  import importlib.metadata as metadata

  return {name: metadata.version(name) for name in ("jax", "flax", "orbax-checkpoint", "grain")}


def write(golden_dir: str = GOLDEN_DIR) -> dict[str, dict[str, dict[str, float]]]:
  """Trains the chain, replaces the golden runs under `golden_dir` and records the metrics of
  the steps after restoring each; returns {stage: {step: {metric: value}}}."""
  with tempfile.TemporaryDirectory(prefix="psvae_golden_") as scratch:
    with _working_directory(scratch):  # parents named by relative directories
      for stage in STAGES:
        run_stage(stage, OVERRIDES[stage], "", STEPS)
    for stage in STAGES:
      target = os.path.join(golden_dir, stage)
      shutil.rmtree(target, ignore_errors=True)
      shutil.copytree(os.path.join(scratch, stage, "checkpoints", str(STEPS)),
                      os.path.join(target, "checkpoints", str(STEPS)))
      parent = PARENTS.get(stage)
      _write_record(target, {
          "config": config_spec(stage), "step": STEPS, "parent": parent,
          "overrides": OVERRIDES[stage],
          "command": ["python", "-m", "psvae_jax.main", f"--config={config_spec(stage)}",
                      f"--workdir={stage}", *cli_flags(OVERRIDES[stage]),
                      f"--config.total_steps={STEPS}"]
                     + ([f"--config.init={parent}"] if parent else []),
          "written_with": _versions()})
  metrics = {}
  for stage in STAGES:
    with tempfile.TemporaryDirectory(prefix="psvae_golden_resume_") as scratch:
      copy_golden(scratch, golden_dir)
      metrics[stage] = resume(stage, scratch)[1]
    target = os.path.join(golden_dir, stage)
    _write_record(target, {**read_record(target), "metrics_after_restore": metrics[stage]})
  return metrics


def _write_record(stage_dir: str, record: dict) -> None:
  with open(os.path.join(stage_dir, RECORD), "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--write", action="store_true",
                      help=f"retrain and replace the golden runs under {GOLDEN_DIR}")
  args = parser.parse_args()
  if not args.write:
    parser.error("nothing to do: pass --write to regenerate the golden checkpoints")
  for stage, by_step in write().items():
    print(f"{stage}: loss after restoring " + ", ".join(
        f"step {step} {values['loss']!r}" for step, values in by_step.items()))


if __name__ == "__main__":
  main()
