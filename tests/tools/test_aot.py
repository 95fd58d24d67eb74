"""psvae_jax.tools.aot: topology parsing, its errors, and the real step compiled for a TPU slice.

Compiling for TPU needs libtpu (`pip install libtpu==0.0.42.1`, the pin of jax[tpu]==0.10.2);
the tests that need it skip with that reason when it cannot be imported. The full compile of the
S-VAE step (30-90 s of TPU compiler time on 2 cores) is marked slow.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from psvae_jax.tools import aot

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install libtpu==0.0.42.1)")

# The S-VAE smoke preset shrunk so that the TPU compile stays short.
TINY = ["--config.model.encoder_resolution=56", "--config.model.svae_depth=1",
        "--config.model.latent_channels=8", "--config.model.pixel_decoder.ch=8",
        "--config.model.pixel_decoder.ch_mult=(1,1,1,1)",
        "--config.model.pixel_decoder.attn_resolutions=()",
        "--config.model.pixel_decoder.resolution=32", "--config.data.image_size=32",
        "--config.batch_size=8"]


@pytest.mark.parametrize("spec,family,shape,chips", [
    ("v5p:2x2x4", "v5p", (2, 2, 4), 16),
    ("v5p-32", "v5p", (2, 2, 4), 16),
    ("v4:2x2x1", "v4", (2, 2, 1), 4),
    ("v4-8", "v4", (2, 2, 1), 4),
    ("v5e:4x4", "v5e", (4, 4), 16),
    ("v5litepod-16", "v5e", (4, 4), 16),
    ("V6E:2x4", "v6e", (2, 4), 8),
    ("v6e-256", "v6e", (16, 16), 256),
])
def test_parse_topology(spec, family, shape, chips):
  topology = aot.parse_topology(spec)
  assert topology.chip.family == family and topology.shape == shape
  assert topology.chips == chips
  assert topology.libtpu_name == f"{family}:{'x'.join(map(str, shape))}"


def test_topology_kwargs_for_libtpu():
  assert aot.parse_topology("v5p:2x2x1").libtpu_kwargs()["chip_config_name"] == "megacore"
  assert aot.parse_topology("v5p:4x4x4").libtpu_kwargs()["wrap"] == (True, True, True)
  assert aot.parse_topology("v5p:2x2x4").libtpu_kwargs()["wrap"] == (False, False, False)
  assert aot.parse_topology("v6e:2x4").libtpu_kwargs()["chips_per_host_bounds"] == (2, 4, 1)
  assert aot.parse_topology("v6e:16x16").libtpu_kwargs()["wrap"] == (True, True, False)


def test_hbm_table():
  gib = 1024**3
  assert {k: c.hbm_bytes // gib for k, c in aot.CHIPS.items()} == {
      "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


@pytest.mark.parametrize("spec,message", [
    ("v9:2x2", "unknown TPU family 'v9'"),
    ("v5p:2x2", "3D chip grid"),
    ("v5e:2x2x2", "2D chip grid"),
    ("v5p-12", "no known slice v5p-12"),
    ("tpu", "is not FAMILY:AxBxC"),
    ("v5p:0x2x2", "positive sizes"),
])
def test_unknown_topologies_are_clear_errors(spec, message):
  with pytest.raises(aot.TopologyError, match=message):
    aot.parse_topology(spec)


def test_missing_libtpu_says_how_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(aot.LibTpuMissing, match=r"pip install 'libtpu==0\.0\.42\.\*'"):
    aot.topology_devices(aot.parse_topology("v5p:2x2x1"))


def _run_aot(*args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO_ROOT}
  return subprocess.run([sys.executable, "-m", "psvae_jax.tools.aot", *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


@needs_libtpu
def test_cli_errors_name_the_problem():
  proc = _run_aot("--config=configs/svae.py:smoke", "--topology=v5p:2x2x1",
                  "--config.mesh.data=8", timeout=120)
  assert proc.returncode != 0
  assert "error: mesh=" in proc.stderr and "the slice has 4 chips" in proc.stderr
  proc = _run_aot("--config=configs/svae.py:smoke", "--topology=v7x:2x2", timeout=120)
  assert proc.returncode != 0 and "error: --topology='v7x:2x2'" in proc.stderr


@needs_libtpu
@pytest.mark.slow
def test_compiles_the_svae_step_for_a_v5p_slice():
  proc = _run_aot("--config=configs/svae.py:smoke", "--topology=v5p:2x2x1",
                  "--config.mesh.data=2", "--config.mesh.fsdp=2", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert len(lines) == 1, proc.stdout
  report = json.loads(lines[0])
  assert report["config"] == "configs/svae.py:smoke" and report["topology"] == "v5p:2x2x1"
  assert report["chips"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert report["hbm_gib"] == 95 and report["fits"] is True
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "total_bytes"):
    assert isinstance(report[key], int) and report[key] >= 0, key
  assert report["argument_bytes"] > 0 and report["alias_bytes"] > 0  # state and EMA donated
  assert report["total_bytes"] == (report["argument_bytes"] + report["output_bytes"]
                                   + report["temp_bytes"] + report["generated_code_bytes"]
                                   - report["alias_bytes"])
  assert report["flops_per_chip"] > 0 and report["est_step_time_s"] > 0


@needs_libtpu
@pytest.mark.slow
def test_compiles_a_two_slice_step_over_a_hybrid_mesh():
  # Two v5p:2x2x1 slices: the data axis spans the slices (mesh.dcn_data=2) and the chips of each.
  proc = _run_aot("--config=configs/svae.py:smoke", "--topology=v5p:2x2x1", "--slices=2",
                  "--config.mesh.dcn_data=2", "--config.mesh.data=4", "--config.mesh.fsdp=2",
                  "--breakdown", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
  assert report["chips"] == 8 and report["slices"] == 2 and report["fits"] is True
  assert report["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
  assert report["breakdown"]["collective_bytes"].get("all-reduce", 0) > 0  # gradients, all slices
  # libtpu's cost model has no time for traffic between slices: reported as none, not negative.
  assert report["est_step_time_s"] is None and report["est_mfu"] is None


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["t2i", "edit"])
def test_compiles_the_generator_step_with_splash_for_tpu_from_this_host(stage):
  # The kernel follows the compile target: a CPU host AOT-compiles the TPU splash kernel, in
  # shard_map over a (data, tensor) mesh, inside the real T2I / edit step (padded text; edit's
  # source tokens).
  from psvae_jax.config_loader import load_config
  config = load_config(f"configs/{stage}.py:smoke", {
      "attention_impl": "splash", "mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 2,
      "batch_size": 4})
  devices = aot.topology_devices(aot.parse_topology("v5p:2x2x1"))
  compiled, mesh, _ = aot.compile_train_step(config, devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  assert "tpu_custom_call" in compiled.as_text()
