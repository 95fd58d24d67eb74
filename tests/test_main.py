"""The command-line contract: `python -m psvae_jax.main --config=... --workdir=...`."""
import glob
import json
import os
import subprocess
import sys

import jax
import pytest

from psvae_jax import config_base, sharding
from psvae_jax import train as train_lib
from psvae_jax.config_loader import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=600):
  env = dict(os.environ)
  env["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")  # one device, fast compiles
  return subprocess.run([sys.executable, "-m", "psvae_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.reliability(fault="unknown config key on the command line",
                         expected="exit != 0; error names the key; nothing written")
def test_unknown_config_key_is_an_error_naming_it(tmp_path):
  result = _main("--config=configs/svae.py:smoke", f"--workdir={tmp_path}",
                 "--config.model.no_such_key=1")
  assert result.returncode != 0
  assert "no_such_key" in result.stderr
  assert not os.path.exists(tmp_path / "config.json")


@pytest.mark.reliability(fault="unknown config preset",
                         expected="ValueError naming it")
def test_unknown_preset_is_an_error():
  with pytest.raises(ValueError, match="unknown preset 'nope'"):
    load_config("configs/svae.py:nope")


@pytest.mark.reliability(fault="mesh needing 3 devices on 8",
                         expected="MeshError naming both counts")
def test_wrong_mesh_size_is_a_clear_error(tmp_path, svae_config):
  config = svae_config(**{"mesh.data": 3})
  with pytest.raises(sharding.MeshError, match="needs 3 devices but 8 are available"):
    train_lib.train(config, str(tmp_path))


@pytest.mark.reliability(fault="batch 12 not divisible by the data-parallel size 8",
                         expected="ConfigError naming both")
def test_batch_not_divisible_by_data_parallel_size(tmp_path, svae_config):
  config = svae_config(**{"batch_size": 12})
  with pytest.raises(config_base.ConfigError, match="batch_size=12 is not divisible"):
    train_lib.train(config, str(tmp_path))


@pytest.mark.reliability(fault="invalid choice config.nonfinite='ignore'",
                         expected="ConfigError naming the key and choices")
def test_bad_choice_is_a_clear_error(tmp_path, svae_config):
  config = svae_config(**{"nonfinite": "ignore"})
  with pytest.raises(config_base.ConfigError, match="config.nonfinite='ignore'"):
    train_lib.train(config, str(tmp_path))


@pytest.mark.reliability(fault="paper preset without pretrained encoder weights",
                         expected="ConfigError saying what to set")
def test_paper_preset_refuses_a_random_encoder(tmp_path, svae_config):
  config = svae_config(**{"model.require_pretrained_encoder": True})
  with pytest.raises(config_base.ConfigError, match="config.init is empty"):
    train_lib.train(config, str(tmp_path))


def test_svae_smoke_end_to_end(tmp_path):
  workdir = tmp_path / "svae"
  result = _main("--config=configs/svae.py:smoke", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "config.json") as f:
    assert json.load(f)["task"] == "svae"
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train_rows = [r for r in rows if "semantic_loss" in r]
  assert train_rows[-1]["step"] == 60
  assert train_rows[-1]["semantic_loss"] < 0.5 * train_rows[0]["semantic_loss"]
  for key in ("perf/images_per_s", "perf/tflops_per_device", "perf/mfu", "progress/eta_s"):
    assert key in train_rows[-1]
  assert any("eval/semantic_cos" in r for r in rows)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["30", "60"]
  assert glob.glob(str(workdir / "events.out.tfevents.*"))
