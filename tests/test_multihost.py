"""Two processes on 127.0.0.1 (4 simulated CPU devices each) train one stage through `main`.

The run is FSDP x data parallel over the 8 global devices (mesh data=2, fsdp=4), checkpoints,
and a second launch of both processes resumes from the last checkpoint instead of starting over.

That the two processes read disjoint slices of one global data order is proven on the data layer
itself by tests/data/test_data_loader.py::test_processes_read_disjoint_slices_of_one_global_order;
here the loop is checked to hand each process its own index and count.

In the default suite: the two processes compile the step (and the end-of-run sample) in each of
the two launches, about 50 s of wall time on 2 cores.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
# Per launch; compiling the step dominates. No persistent compilation cache here: on CPU only
# process 0 writes it and the processes' cache keys differ, so in a second launch process 0 could
# load the step while process 1 recompiles it, and the first collective would time out.
LAUNCH_TIMEOUT_S = 300

# The S-VAE smoke preset shrunk to a few-second step: 32 px images, one block, tiny decoder.
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


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env() -> dict:
  env = dict(os.environ)
  # 4 devices per process (the test session itself has 8) and the suite's fast-compile flags.
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=4"
                      " --xla_backend_optimization_level=0"
                      " --xla_llvm_disable_expensive_passes=true")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _launch(workdir, log_dir, total_steps: int, tag: str) -> list[str]:
  """Runs both processes to completion; returns their combined logs (stdout + stderr)."""
  port = _free_port()
  overrides = {**OVERRIDES, "total_steps": total_steps}
  logs, procs = [], []
  try:
    for pid in range(NUM_PROCESSES):
      log_path = os.path.join(log_dir, f"{tag}_process{pid}.log")
      logs.append(log_path)
      cmd = [sys.executable, "-m", "psvae_jax.main", "--config=configs/svae.py:smoke",
             f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={NUM_PROCESSES}", f"--process_id={pid}",
             "--log_level=info"]  # the assertions read INFO lines from the console
      cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
      with open(log_path, "w") as log:
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for pid, proc in enumerate(procs):
      try:
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        pytest.fail(f"{tag}: process {pid} still running after {LAUNCH_TIMEOUT_S} s\n"
                    + _tails(logs))
      if rc != 0:
        pytest.fail(f"{tag}: process {pid} exited with {rc}\n" + _tails(logs))
  finally:
    for proc in procs:  # only the processes this test started, by their own group
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  return [open(p).read() for p in logs]


def _tails(paths, lines: int = 40) -> str:
  out = []
  for path in paths:
    text = open(path).read().splitlines() if os.path.exists(path) else []
    out.append(f"--- {os.path.basename(path)} (last {lines} lines)\n" + "\n".join(text[-lines:]))
  return "\n".join(out)


def _metric_steps(workdir) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


def test_two_processes_train_fsdp_checkpoint_and_resume(tmp_path):
  workdir = str(tmp_path / "run")
  logs_dir = tmp_path / "logs"
  logs_dir.mkdir()

  first = _launch(workdir, str(logs_dir), total_steps=4, tag="first")
  for pid, log in enumerate(first):
    assert f"process {pid} of 2; 4 local / 8 global devices" in log, log[-3000:]
    assert "start at step 0 (scratch)" in log, log[-3000:]
    assert "'data': 2, 'fsdp': 4, 'tensor': 1" in log
    assert f"process {pid}/2" in log  # the data iterator reads this process's slice
  assert _metric_steps(workdir) == [2, 4]
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps[-1] == 4, steps

  second = _launch(workdir, str(logs_dir), total_steps=6, tag="second")
  for log in second:
    assert "start at step 4 (workdir step 4)" in log, log[-3000:]
    assert "start at step 0" not in log
  # Process 0 appends to the same metrics file: the resumed run logs only its new step.
  assert _metric_steps(workdir) == [2, 4, 6]
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps[-1] == 6, steps
