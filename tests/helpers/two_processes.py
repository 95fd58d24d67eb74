"""Two `psvae_jax.main` processes on 127.0.0.1, 4 simulated CPU devices each: launching both,
signalling one, waiting for them, and reading what they wrote.

The job is the S-VAE smoke preset shrunk to a few-second step, FSDP x data parallel over the 8
global devices (mesh data=2, fsdp=4). No persistent compilation cache: on CPU only process 0
writes it and the processes' cache keys differ, so in a later launch process 0 could load the
step while process 1 recompiles it, and the first collective would time out.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_PROCESSES = 2
# Per launch; compiling the step dominates.
LAUNCH_TIMEOUT_S = 300

OVERRIDES = {
    "mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1,
    "batch_size": 8, "log_every": 2, "checkpoint_every": 2, "eval_every": 0, "eval_batches": 1,
    "sample_every": 0,
    "data.image_size": 32, "data.synthetic_size": 256, "data.eval_size": 16,
    "model.encoder_resolution": 56, "model.svae_depth": 1, "model.latent_channels": 8,
    "model.pixel_decoder.ch": 8, "model.pixel_decoder.ch_mult": "(1,1,1,2)",
    "model.pixel_decoder.attn_resolutions": "()", "model.pixel_decoder.resolution": 32,
    "logging.tensorboard": False, "logging.peak_flops_per_device": 1e12,
    "checkpoint.async_save": False,
}


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env() -> dict:
  """4 devices per process (a test session itself has 8) and the suite's fast-compile flags."""
  out = dict(os.environ)
  out["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=4"
                      " --xla_backend_optimization_level=0"
                      " --xla_llvm_disable_expensive_passes=true")
  out["JAX_PLATFORMS"] = "cpu"
  out["PYTHONPATH"] = REPO_ROOT + os.pathsep + out.get("PYTHONPATH", "")
  out["PYTHONUNBUFFERED"] = "1"
  return out


class Job:
  """Both processes of one launch, each in its own session, output in LOG_DIR/<tag>_process<i>.log.
  As a context manager it kills (SIGKILL, by process group) whatever is still running at exit."""

  def __init__(self, workdir: str, log_dir: str, tag: str, overrides: dict,
               flags: tuple[str, ...] = ()):
    port = free_port()
    self.tag = tag
    self.log_paths = [os.path.join(log_dir, f"{tag}_process{pid}.log")
                      for pid in range(NUM_PROCESSES)]
    self.procs: list[subprocess.Popen] = []
    for pid, log_path in enumerate(self.log_paths):
      cmd = [sys.executable, "-m", "psvae_jax.main", "--config=configs/svae.py:smoke",
             f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={NUM_PROCESSES}", f"--process_id={pid}",
             "--log_level=info", *flags]  # the assertions read INFO lines from the console
      cmd += [f"--config.{k}={v}" for k, v in {**OVERRIDES, **overrides}.items()]
      with open(log_path, "w") as log:
        self.procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env(), stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for proc in self.procs:  # only the processes this job started, by their own group
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

  def signal(self, pid: int, signum: int) -> float:
    """Sends `signum` to process `pid`; returns the monotonic time it was sent."""
    self.procs[pid].send_signal(signum)
    return time.monotonic()

  def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> list[int]:
    """The processes' exit statuses; fails the test when one is still running after `timeout`."""
    deadline = time.monotonic() + timeout
    codes = []
    for pid, proc in enumerate(self.procs):
      try:
        codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1)))
      except subprocess.TimeoutExpired:
        pytest.fail(f"{self.tag}: process {pid} still running after {timeout:.0f} s\n"
                    + self.tails())
    return codes

  def wait_for_step(self, workdir: str, step: int, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Until process 0 has logged metrics at `step` or later (training is under way)."""
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in metric_steps(workdir)):
      for pid, proc in enumerate(self.procs):
        if proc.poll() is not None:
          pytest.fail(f"{self.tag}: process {pid} exited with {proc.returncode} before step "
                      f"{step}\n" + self.tails())
      if time.monotonic() > deadline:
        pytest.fail(f"{self.tag}: no step {step} after {timeout:.0f} s\n" + self.tails())
      time.sleep(0.2)

  def logs(self) -> list[str]:
    return [open(p).read() for p in self.log_paths]

  def tails(self, lines: int = 40) -> str:
    out = []
    for path in self.log_paths:
      text = open(path).read().splitlines() if os.path.exists(path) else []
      out.append(f"--- {os.path.basename(path)} (last {lines} lines)\n" + "\n".join(text[-lines:]))
    return "\n".join(out)


def launch(workdir: str, log_dir: str, tag: str, overrides: dict) -> list[str]:
  """Runs both processes to completion (both must exit 0); returns their outputs."""
  with Job(workdir, log_dir, tag, overrides) as job:
    codes = job.wait()
    for pid, code in enumerate(codes):
      if code != 0:
        pytest.fail(f"{tag}: process {pid} exited with {code}\n" + job.tails())
    return job.logs()


def metric_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    complete = f.read().split("\n")[:-1]  # the last line may still be being written
  return [json.loads(line)["step"] for line in complete if line.strip()]


def checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())
