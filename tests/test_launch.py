"""The launch scripts, offline: shellcheck, and the commands their dry-run mode prints."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO_ROOT, "launch", "**", "*.sh"), recursive=True)
                 + glob.glob(os.path.join(REPO_ROOT, "launch", "**", "*.sbatch"), recursive=True))
TPU_ENV = {"TPU_NAME": "psvae-test", "ZONE": "us-east5-a", "ACCELERATOR_TYPE": "v5p-32"}


def _bash(script, *args, env=None, check=True):
  full_env = {k: v for k, v in os.environ.items()
              if not k.startswith(("SLURM_", "TPU_", "DRY_RUN", "QUEUED", "SPOT"))}
  full_env.update(env or {})
  proc = subprocess.run(["bash", os.path.join(REPO_ROOT, script), *args], cwd=REPO_ROOT,
                        env=full_env, capture_output=True, text=True, timeout=60)
  if check and proc.returncode != 0:
    pytest.fail(f"{script} {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
  return proc


def _commands(stdout: str) -> list[str]:
  return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def test_scripts_exist():
  names = {os.path.relpath(p, REPO_ROOT) for p in SCRIPTS}
  for name in ("launch/xla_flags.sh", "launch/tpu/create.sh", "launch/tpu/setup.sh",
               "launch/tpu/run.sh", "launch/tpu/supervise.sh", "launch/tpu/delete.sh",
               "launch/gpu/slurm.sbatch", "launch/gpu/single_node.sh"):
    assert name in names


def test_bash_syntax():
  for path in SCRIPTS:
    subprocess.run(["bash", "-n", path], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
  proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=REPO_ROOT, capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_strict():
  for path in SCRIPTS:
    if path.endswith(("xla_flags.sh", "common.sh")):  # sourced: they change no shell options
      continue
    assert "set -euo pipefail" in open(path).read(), path


# --- TPU ---------------------------------------------------------------------------------

def test_tpu_run_on_all_workers_with_gcs_workdir():
  out = _bash("launch/tpu/run.sh", "configs/svae.py", "gs://bucket/runs/svae",
              "--config.batch_size=128", "--dry-run", env=TPU_ENV).stdout
  (cmd,) = _commands(out)
  assert cmd.startswith("gcloud compute tpus tpu-vm ssh psvae-test --zone=us-east5-a --worker=all")
  assert "launch/tpu/worker_run.sh --config=configs/svae.py --workdir=gs://bucket/runs/svae" in cmd
  assert "--compilation_cache_dir=gs://bucket/runs/svae/xla_cache" in cmd
  assert cmd.rstrip("'").endswith("--config.batch_size=128")


def test_tpu_run_refuses_a_local_workdir_and_missing_settings():
  proc = _bash("launch/tpu/run.sh", "configs/svae.py", "/tmp/run", "--dry-run", env=TPU_ENV,
               check=False)
  assert proc.returncode != 0 and "gs://" in proc.stderr
  proc = _bash("launch/tpu/run.sh", "configs/svae.py", "gs://b/r", "--dry-run",
               env={"ZONE": "z"}, check=False)
  assert proc.returncode != 0 and "TPU_NAME is not set" in proc.stderr


def test_tpu_create_direct_and_queued_spot():
  (cmd,) = _commands(_bash("launch/tpu/create.sh", env={**TPU_ENV, "DRY_RUN": "1"}).stdout)
  assert cmd == ("gcloud compute tpus tpu-vm create psvae-test --zone=us-east5-a "
                 "--accelerator-type=v5p-32 --version=v2-alpha-tpuv5")
  env = {**TPU_ENV, "QUEUED": "1", "SPOT": "1", "VALID_UNTIL": "6h", "PROJECT": "my-proj",
         "ACCELERATOR_TYPE": "v6e-16"}
  (cmd,) = _commands(_bash("launch/tpu/create.sh", "--dry-run", env=env).stdout)
  assert cmd.startswith("gcloud compute tpus queued-resources create psvae-test-qr")
  for part in ("--node-id=psvae-test", "--accelerator-type=v6e-16", "--project=my-proj",
               "--runtime-version=v2-alpha-tpuv6e", "--spot", "--valid-until-duration=6h"):
    assert part in cmd.split(), part
  (cmd,) = _commands(_bash("launch/tpu/delete.sh", "--dry-run", env={**TPU_ENV, "QUEUED": "1"}).stdout)
  assert cmd.startswith("gcloud compute tpus queued-resources delete psvae-test-qr") and "--force" in cmd


def test_tpu_setup_copies_code_and_installs_on_every_worker():
  cmds = _commands(_bash("launch/tpu/setup.sh", "--dry-run", env=TPU_ENV).stdout)
  assert cmds[0].startswith("tar ") and "--exclude=.git" in cmds[0]
  assert cmds[1].startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in cmds[1]
  assert all("--worker=all" in c for c in cmds[1:])
  assert "install_worker.sh" in cmds[-1]
  git = _commands(_bash("launch/tpu/setup.sh", "--dry-run", env={
      **TPU_ENV, "CODE_SOURCE": "git", "GIT_URL": "https://example.org/psvae_jax.git",
      "GIT_REF": "v1"}).stdout)
  assert "git clone --quiet https://example.org/psvae_jax.git psvae_jax" in git[0]
  assert "git fetch --quiet origin v1" in git[0]


def test_tpu_worker_install_pins_jax_tpu_and_leaves_torch_out():
  out = _bash("launch/tpu/install_worker.sh", env={"DRY_RUN": "1"}).stdout
  jax_pin = next(line for line in open(os.path.join(REPO_ROOT, "requirements.txt"))
                 if line.startswith("jax=="))
  assert f"jax[tpu]=={jax_pin.split('==')[1].strip()}" in out
  requirements = [line.split("requirement: ", 1)[1] for line in out.splitlines()
                  if "requirement: " in line]
  assert any(r.startswith("flax==") for r in requirements)
  assert not any(r.startswith("torch") for r in requirements)


def test_tpu_supervisor_reruns_after_preemption_and_recreates_a_lost_slice():
  env = {**TPU_ENV, "SPOT": "1", "DRY_RUN_EXIT_CODES": "143 0"}
  out = _bash("launch/tpu/supervise.sh", "configs/svae.py", "gs://b/r", "--dry-run", env=env).stdout
  runs = [c for c in _commands(out) if "worker_run.sh" in c]
  assert len(runs) == 2 and "resuming from the last checkpoint" in out
  assert "finished after 2 attempt(s)" in out

  env = {**env, "DRY_RUN_TPU_STATE": "PREEMPTED", "DRY_RUN_EXIT_CODES": "0"}
  cmds = _commands(_bash("launch/tpu/supervise.sh", "configs/svae.py", "gs://b/r", "--dry-run",
                         env=env).stdout)
  delete = next(i for i, c in enumerate(cmds) if " delete " in c)
  create = next(i for i, c in enumerate(cmds) if " create " in c)
  run = next(i for i, c in enumerate(cmds) if "worker_run.sh" in c)
  assert delete < create < run and "--spot" in cmds[create]


def test_tpu_supervisor_gives_up_on_repeated_failures():
  env = {**TPU_ENV, "DRY_RUN_EXIT_CODES": "1 1 1", "MAX_FAILURES": "2"}
  proc = _bash("launch/tpu/supervise.sh", "configs/svae.py", "gs://b/r", "--dry-run", env=env,
               check=False)
  assert proc.returncode != 0 and "2 consecutive failures" in proc.stderr


# --- GPU ---------------------------------------------------------------------------------

@pytest.fixture
def fake_scontrol(tmp_path):
  """A stand-in `scontrol show hostnames` that expands the test's node list."""
  script = tmp_path / "scontrol"
  script.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a001\\ngpu-a002\\n"\n')
  script.chmod(0o755)
  return {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}


def test_slurm_coordinator_is_the_first_node(fake_scontrol):
  env = {**fake_scontrol, "SLURM_JOB_ID": "4321", "SLURM_JOB_NODELIST": "gpu-a[001-002]",
         "SLURM_NTASKS": "16", "DRY_RUN": "1"}
  out = _bash("launch/gpu/slurm.sbatch", "configs/svae.py", "/shared/runs/svae",
              "--config.batch_size=256", env=env).stdout
  assert "coordinator gpu-a001:24321" in out
  (cmd,) = _commands(out)
  assert cmd.startswith("srun --kill-on-bad-exit=1 --ntasks=16 bash launch/gpu/slurm_task.sh")
  assert "--workdir=/shared/runs/svae" in cmd and cmd.endswith("--config.batch_size=256")
  script = open(os.path.join(REPO_ROOT, "launch/gpu/slurm.sbatch")).read()
  assert "#SBATCH --requeue" in script and "--signal=TERM@" in script


def test_slurm_task_joins_with_its_rank():
  env = {"PSVAE_COORDINATOR": "gpu-a001:24321", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
         "SLURM_LOCALID": "1", "DRY_RUN": "1"}
  (cmd,) = _commands(_bash("launch/gpu/slurm_task.sh", "--config=configs/svae.py",
                           "--workdir=/shared/run", env=env).stdout)
  assert cmd.startswith("CUDA_VISIBLE_DEVICES=1 python3 -m psvae_jax.main")
  for part in ("--coordinator_address=gpu-a001:24321", "--num_processes=16", "--process_id=9",
               "--config=configs/svae.py", "--workdir=/shared/run"):
    assert part in cmd.split(), part
  (cmd,) = _commands(_bash("launch/gpu/slurm_task.sh", "--config=c.py", "--workdir=/w",
                           env={**env, "PSVAE_PROCS": "node"}).stdout)
  assert "CUDA_VISIBLE_DEVICES" not in cmd  # one process drives all GPUs of its node


def test_single_node_gpu_command():
  (cmd,) = _commands(_bash("launch/gpu/single_node.sh", "configs/svae.py", "/runs/svae",
                           "--config.mesh.fsdp=8", "--dry-run").stdout)
  assert cmd == ("python3 -m psvae_jax.main --config=configs/svae.py --workdir=/runs/svae "
                 "--compilation_cache_dir=/runs/svae/xla_cache --config.mesh.fsdp=8")


# --- XLA flags -----------------------------------------------------------------------------

def _exports(platform: str) -> dict:
  out = _bash("launch/xla_flags.sh", platform, env={"XLA_FLAGS": "", "LIBTPU_INIT_ARGS": ""}).stdout
  pairs = [line[len("export "):].split("=", 1) for line in out.splitlines()]
  return {k: v.strip('"') for k, v in pairs}


def test_xla_flags_per_platform():
  tpu = _exports("tpu")
  assert "--xla_tpu_enable_async_collective_fusion=true" in tpu["LIBTPU_INIT_ARGS"]
  gpu = _exports("gpu")
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in gpu["XLA_FLAGS"]
  assert gpu["NCCL_DEBUG"] == "WARN"
  assert _bash("launch/xla_flags.sh", "nope", check=False).returncode == 2
  # User flags come after the recommended ones, so they win.
  out = _bash("launch/xla_flags.sh", "gpu", env={"XLA_FLAGS": "--xla_dump_to=/tmp/d"}).stdout
  assert '--xla_gpu_enable_while_loop_double_buffering=true --xla_dump_to=/tmp/d"' in out


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                        capture_output=True, text=True, timeout=120)


def test_gpu_xla_flags_are_known_to_this_xla():
  # XLA rejects unknown flags at start-up on every backend, so CPU jax validates the GPU set.
  flags = _exports("gpu")["XLA_FLAGS"]
  proc = _python("import jax; jax.devices()", {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_tpu_flags_are_known_to_the_pinned_libtpu():
  pytest.importorskip("libtpu", reason="libtpu is not installed (pip install libtpu)")
  flags = _exports("tpu")["LIBTPU_INIT_ARGS"]
  code = ("from jax.experimental import topologies; "
          "print(len(topologies.get_topology_desc('v5e:2x2', 'tpu').devices))")
  env = {"LIBTPU_INIT_ARGS": flags, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  proc = _python(code, env)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("4"), proc.stderr[-2000:]
  bad = _python(code, {**env, "LIBTPU_INIT_ARGS": "--xla_tpu_no_such_flag=true"})
  assert bad.returncode != 0  # so the check above would catch a misspelt flag
