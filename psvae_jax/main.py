"""Entry point: `python -m psvae_jax.main --config=configs/<stage>.py[:preset] --workdir=DIR`.

Runs one stage (config.task = svae | psvae | t2i | edit) or a pipeline of stages. Any config
key can be overridden with `--config.a.b=value`; an unknown key is an error naming it.
Multi-host: pass --coordinator_address/--num_processes/--process_id, or let a TPU pod / SLURM
environment be detected.
"""
from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for jax.distributed.initialize.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", os.environ.get("PSVAE_COMPILATION_CACHE", ""),
    "Persistent XLA compilation cache directory ('' = off).")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str):
  """Runs the stage or pipeline described by `config` in `workdir`; returns its summary."""
  if config.task == "pipeline":
    from psvae_jax import stage_chain
    return stage_chain.run(config, workdir)
  from psvae_jax import train
  return train.train(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  from psvae_jax import distributed

  if _COMPILATION_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.getLogger().setLevel(logging.INFO)
  summary = run(_CONFIG.value, _WORKDIR.value)
  logging.info("done: %s", {k: v for k, v in summary.items() if k != "last_metrics"})


if __name__ == "__main__":
  app.run(main)
