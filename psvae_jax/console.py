"""The console of a run: a few readable lines on stderr, everything else in WORKDIR/log.txt.

The console shows the lines written with `say` (stage start and end, progress at the log
interval, where the outputs are), and every warning and error from any library. INFO records
of the libraries (Orbax, absl, grain, the project's own detail lines) go to the log file only;
`--log_level=info` (or absl's `--verbosity=0`) puts them back on the console.
"""
from __future__ import annotations

import glob
import logging
import os
import sys
import tempfile

CONSOLE_LOGGER = "psvae_jax.console"
LOG_FILE = "log.txt"
_FORMAT = "%(levelname).1s%(asctime)s %(name)s %(filename)s:%(lineno)d] %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")

_console = logging.getLogger(CONSOLE_LOGGER)


def quiet_native_logs() -> None:
  """Silences native start-up noise before jax or TensorFlow load: TensorFlow's C++ INFO, and
  libtpu's metadata-server probe on hosts without TPU chips (libtpu is installed on CPU
  machines for the AOT compile checks). Variables the user set are kept."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # TensorFlow (loaded for the TensorBoard writer only, it computes nothing here) announces its
  # oneDNN kernels at import through a C++ logger that ignores TF_CPP_MIN_LOG_LEVEL.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*")):
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def say(message: str, *args) -> None:
  """One console line (and the log file's copy of it)."""
  _console.info(message, *args)


class _ConsoleFilter(logging.Filter):
  """Passes `say` lines and records at or above the console level."""

  def __init__(self, level: int):
    super().__init__()
    self.level = level

  def filter(self, record: logging.LogRecord) -> bool:
    return record.name == CONSOLE_LOGGER or record.levelno >= self.level


def log_file_path(workdir: str, process_index: int = 0) -> str:
  """WORKDIR/log.txt (log.process<N>.txt for the other processes). A remote workdir (gs://...)
  cannot be appended to, so its log file is a local file named after it."""
  name = LOG_FILE if process_index == 0 else f"log.process{process_index}.txt"
  if "://" in workdir:
    local = os.path.join(tempfile.gettempdir(), "psvae_jax_logs",
                         workdir.split("://", 1)[1].strip("/").replace("/", "_"))
    return os.path.join(local, name)
  return os.path.join(workdir, name)


def setup(workdir: str, log_level: str = "warning", process_index: int = 0) -> str:
  """Routes logging: console (stderr) gets `say` lines and records >= `log_level`; the log file
  gets every record >= INFO (>= DEBUG with log_level='debug'). Replaces absl's stderr handler.
  Returns the log file's path."""
  from absl import logging as absl_logging

  if log_level not in LOG_LEVELS:
    raise ValueError(f"--log_level={log_level!r}: expected one of {LOG_LEVELS}")
  level = getattr(logging, log_level.upper())
  root = logging.getLogger()
  root.removeHandler(absl_logging.get_absl_handler())
  for handler in [h for h in root.handlers if getattr(h, "_psvae_console", False)]:
    root.removeHandler(handler)
    handler.close()
  file_level = min(level, logging.INFO)
  root.setLevel(file_level)
  # absl loggers (Orbax logs through absl) follow absl's verbosity, not the root level.
  absl_logging.set_verbosity(absl_logging.DEBUG if file_level == logging.DEBUG else
                             absl_logging.INFO)

  path = log_file_path(workdir, process_index)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  file_handler = logging.FileHandler(path)
  file_handler.setFormatter(logging.Formatter(_FORMAT))
  console = logging.StreamHandler(sys.stderr)
  console.addFilter(_ConsoleFilter(level))
  console.setFormatter(_ConsoleFormatter())
  for handler in (file_handler, console):
    handler._psvae_console = True  # so a second setup replaces them
    root.addHandler(handler)
  # Only process 0 speaks on the console; the others still log warnings and errors.
  _console.disabled = process_index != 0
  return path


class _ConsoleFormatter(logging.Formatter):
  """`say` lines as they are; other records prefixed with their level (and logger name)."""

  def format(self, record: logging.LogRecord) -> str:
    if record.name == CONSOLE_LOGGER:
      return record.getMessage()
    text = f"{record.levelname.lower()}: {record.getMessage()}"
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return text


def duration(seconds: float) -> str:
  """12.3 -> '12.3s', 754 -> '12m34s', 4000 -> '1h06m40s'."""
  if seconds < 60:
    return f"{seconds:.1f}s"
  minutes, secs = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f"{minutes}m{secs:02d}s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s"


def progress_line(step: int, total: int, scalars: dict) -> str:
  """'step 20/50  loss 0.1234  3.21 step/s  ETA 9.3s' from the logged scalars."""
  parts = [f"step {step}/{total}"]
  if "loss" in scalars:
    parts.append(f"loss {scalars['loss']:.4g}")
  if "perf/steps_per_s" in scalars:
    parts.append(f"{scalars['perf/steps_per_s']:.3g} step/s")
  if "progress/eta_s" in scalars and step < total:
    parts.append(f"ETA {duration(scalars['progress/eta_s'])}")
  return "  ".join(parts)


def headline(summary: dict) -> str:
  """The metric a stage is judged by: its last eval scalars if it has any, else the last loss."""
  scalars = summary.get("last_eval") or {}
  if scalars:
    return " ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in sorted(scalars.items()))
  loss = (summary.get("last_metrics") or {}).get("loss")
  return f"loss={loss:.4g}" if loss is not None else "no new steps"


def outputs_report(workdir: str, stage_dirs: list[str], log_path: str) -> None:
  """The closing lines: where the checkpoints, TensorBoard events, samples and log file are."""
  def existing(sub: str) -> list[str]:
    return [os.path.join(d, sub) for d in stage_dirs if os.path.isdir(os.path.join(d, sub))]

  samples = existing("samples")
  count = sum(len(glob.glob(os.path.join(d, "*.png"))) for d in samples)
  say("checkpoints: %s", " ".join(existing("checkpoints")) or "none written")
  say("TensorBoard events: tensorboard --logdir %s", workdir)
  say("sample images: %s", f"{count} PNG in {' '.join(samples)}" if samples else "none written")
  say("full log: %s", log_path)
