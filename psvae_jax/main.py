"""Entry point: `python -m psvae_jax.main --config=configs/<stage>.py[:preset] --workdir=DIR`.

Runs one stage (config.task = svae | psvae | t2i | edit) or a pipeline of stages. Any config
key can be overridden with `--config.a.b=value`; an unknown key is an error naming it.
Multi-host: pass --coordinator_address/--num_processes/--process_id, or let a TPU pod / SLURM
environment be detected. Every process must be started; they then stop together:
- one process gets SIGTERM: all save a checkpoint at one agreed step and exit 143;
- one process dies or stops answering: within --peer_timeout_s (default 100) the others print
  `error: lost contact with process N (...)` and exit 75. The checkpoints already written stay
  complete; starting all processes again resumes from the last one.

The console shows one line per stage start and end, progress at the log interval, warnings and
errors, and at the end where the outputs are; library INFO goes to WORKDIR/log.txt
(`--log_level=info` shows it). An error the user can fix (config, data, checkpoint, weights,
mesh, input files) prints `error: <message>` and exits with status 2 (`--traceback` shows where).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from psvae_jax import console, distributed, errors, peer_supervisor

console.quiet_native_logs()  # before anything imports jax or TensorFlow

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for jax.distributed.initialize.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_PEER_TIMEOUT = flags.DEFINE_integer(
    "peer_timeout_s", distributed.DEFAULT_PEER_TIMEOUT_S,
    "Multi-process runs: seconds without a heartbeat after which a process counts as lost and "
    "the others stop (exit 75).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", os.environ.get("PSVAE_COMPILATION_CACHE", ""),
    "Persistent XLA compilation cache directory ('' = off).")
_LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "warning", console.LOG_LEVELS,
    "Lowest level of library records on the console (all INFO is in WORKDIR/log.txt).")
_TRACEBACK = flags.DEFINE_bool("traceback", False,
                               "Show the traceback of errors the user can fix.")
flags.mark_flags_as_required(["config", "workdir"])

# Exceptions config_flags raises while parsing a config file or a --config.key=value override.
_CONFIG_PARSE_ERRORS = (errors.UserError, flags.Error, KeyError, AttributeError, ValueError,
                        TypeError, OSError)


def run(config, workdir: str):
  """Runs the stage or pipeline described by `config` in `workdir`; returns its summary."""
  if config.task == "pipeline":
    from psvae_jax import stage_chain
    return stage_chain.run(config, workdir)
  from psvae_jax import train
  return train.train(config, workdir)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad flag, config file or config key is a one-line error."""
  try:
    return flags.FLAGS(argv)
  except _CONFIG_PARSE_ERRORS as e:
    if "--traceback" in argv:
      raise
    errors.exit_with(errors.UserError(_flag_error_text(e, argv)))


def _flag_error_text(error: BaseException, argv: list[str]) -> str:
  """The message, with the --config override it came from when an unknown key is the cause."""
  inner = error
  while inner.args and isinstance(inner.args[0], BaseException):  # AttributeError(KeyError(..))
    inner = inner.args[0]
  if not isinstance(error, (KeyError, AttributeError)) or not inner.args:
    return errors.message(error)
  # ml_collections: "'totl_steps'\nDid you mean "total_steps" instead of "totl_steps"?"
  first, _, hint = str(inner.args[0]).partition("\n")
  key = first.strip("'\"")
  culprit = next((a for a in argv[1:] if a.startswith("--config.") and
                  key in a.split("=", 1)[0].split(".")), None)
  text = f"unknown config key {key!r}" + (f" in {culprit}" if culprit else "")
  return text + (f" ({hint.strip()})" if hint else "")


def _console_level() -> str:
  """--log_level, or absl's --verbosity when given (0 = info, > 0 = debug)."""
  verbosity = flags.FLAGS["verbosity"]
  if verbosity.present and not flags.FLAGS["log_level"].present:
    return "debug" if verbosity.value > 0 else "info" if verbosity.value == 0 else "warning"
  return _LOG_LEVEL.value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _PEER_TIMEOUT.value < 1:
    errors.exit_with(errors.UserError(f"--peer_timeout_s={_PEER_TIMEOUT.value} must be at "
                                      "least 1 second"))
  if distributed.is_multiprocess(_NUM_PROCESSES.value):
    status = peer_supervisor.supervise(workdir=_WORKDIR.value, peer_timeout_s=_PEER_TIMEOUT.value)
    if status is not None:  # the launched process, once its worker has ended
      sys.exit(status)
  try:
    _main()
  except errors.UserError as e:
    if _TRACEBACK.value:
      raise
    errors.exit_with(e)


def _main():
  import jax

  if _COMPILATION_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  workdir = _WORKDIR.value
  log_path = console.setup(workdir, _console_level(), process_index=_PROCESS_ID.value or 0)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         peer_timeout_s=_PEER_TIMEOUT.value)
  if jax.process_index() != (_PROCESS_ID.value or 0):  # index detected from a pod or SLURM
    log_path = console.setup(workdir, _console_level(), process_index=jax.process_index())
  peer_supervisor.announce_log_file(log_path)
  config = _CONFIG.value
  try:
    summary = run(config, workdir)
  except jax.errors.JaxRuntimeError:
    if jax.process_count() > 1:
      logging.info("a runtime error in a multi-process run; if a process was lost, the "
                   "distributed runtime stops this one within --peer_timeout_s")
      peer_supervisor.await_runtime_verdict(_PEER_TIMEOUT.value)
    raise
  stage_dirs = ([os.path.join(workdir, name) for name in summary] if config.task == "pipeline"
                else [workdir])
  console.outputs_report(workdir, stage_dirs, log_path)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
