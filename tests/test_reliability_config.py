"""Bad configs and weights: each is one error naming the problem. Unsafe weight formats are
refused with the way to convert them, and no code path trusts remote code."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from psvae_jax import sharding
from psvae_jax.config_loader import load_config
from psvae_jax.data import DataError
from psvae_jax.data.loader import resolve_data_config
from psvae_jax.ports.common import PICKLE_SUFFIXES, TensorPool, WeightLoadError, assign
from psvae_jax.ports.common import read_safetensors

pytestmark = pytest.mark.reliability

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.reliability(fault="wrong type on the command line (--config.batch_size=abc)",
                         expected="exit != 0; error names the flag")
def test_wrong_type_on_the_command_line_names_the_flag(tmp_path):
  result = subprocess.run([sys.executable, "-m", "psvae_jax.main", "--config=configs/svae.py:smoke",
                           f"--workdir={tmp_path}", "--config.batch_size=abc"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "--config.batch_size=abc" in result.stderr and "invalid literal for int()" in result.stderr
  assert not os.path.exists(tmp_path / "config.json")


@pytest.mark.reliability(fault="wrong type in a config override: {key}={value!r}",
                         expected="TypeError naming the key")
@pytest.mark.parametrize("key,value", [("batch_size", "abc"), ("optim.lr", "fast"),
                                       ("checkpoint.async_save", "yes"),
                                       ("data.image_size", 2.5)])
def test_wrong_type_override_names_the_key(key, value):
  with pytest.raises(TypeError, match=f"Could not override field '{key.split('.')[-1]}'"):
    load_config("configs/svae.py:smoke", {key: value})


@pytest.mark.reliability(fault="wrong type in the data config: {cfg}",
                         expected="DataError naming the key")
@pytest.mark.parametrize("cfg", [{"image_size": "big"}, {"max_bad_fraction": "some"}])
def test_wrong_type_in_the_data_config_names_the_key(cfg):
  with pytest.raises(DataError, match=f"data config: .*'{next(iter(cfg))}'"):
    resolve_data_config(cfg)


@pytest.mark.reliability(fault="impossible mesh on 8 devices: {mesh}",
                         expected="MeshError saying why")
@pytest.mark.parametrize("mesh,message", [
    ({"data": -1, "fsdp": 3}, "not divisible by the fixed axes' product 3"),
    ({"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
    ({"data": 0}, "must be positive or -1"),
    ({"data": 8, "pipeline": 1}, r"unknown mesh axes \['pipeline'\]"),
    ({"data": 4, "fsdp": 4}, "needs 16 devices but 8 are available"),
])
def test_impossible_mesh_shapes(mesh, message):
  with pytest.raises(sharding.MeshError, match=message):
    sharding.mesh_shape(mesh, 8)


@pytest.mark.reliability(fault="weights with missing, extra and mis-shaped tensors",
                         expected="one WeightLoadError listing all three")
def test_weights_missing_extra_and_misshaped_in_one_error():
  model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  pool = TensorPool({"w": np.zeros((3, 5), np.float32), "unused.head": np.zeros(2, np.float32)},
                    source="weights.safetensors")
  targets = {"kernel": pool.take("w"), "bias": pool.take("b")}
  with pytest.raises(WeightLoadError) as info:
    assign(model, targets, pool, what="a linear layer")
  message = str(info.value)
  assert "missing in weights.safetensors: b" in message
  assert "unexpected tensors in weights.safetensors: unused.head" in message
  assert "kernel: checkpoint (3, 5) vs model (3, 4)" in message


@pytest.mark.reliability(fault="pickle-based weight file ({suffix}) given {given}",
                         expected="refused; message says how to convert to safetensors")
@pytest.mark.parametrize("given", ["as a file", "in a directory"])
@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_weight_files_are_refused_with_how_to_convert(tmp_path, suffix, given):
  assert suffix in PICKLE_SUFFIXES
  path = tmp_path / f"model{suffix}"
  path.write_bytes(b"\x80\x04 never unpickled")
  with pytest.raises(WeightLoadError) as info:
    read_safetensors(str(path) if given == "as a file" else str(tmp_path))
  message = str(info.value)
  assert f"model{suffix}" in message and "pickle" in message
  assert "safetensors" in message and "save_file" in message and "weights_only=True" in message


def _source_files():
  skip = {".git", "__pycache__", ".venv", "venv", "node_modules"}
  for root, dirs, files in os.walk(REPO):
    dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
    for name in files:
      if name.endswith((".py", ".sh", ".md", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".txt")):
        yield os.path.join(root, name)


@pytest.mark.reliability(fault="remote code or unsafe unpickling in the code base",
                         expected="no remote code; torch.load only with weights_only=True")
def test_no_remote_code_and_no_unsafe_unpickling():
  trust = re.compile(r"trust_remote_code\s*=\s*True")
  torch_load = re.compile(r"torch\.load\(")
  offenders = []
  for path in _source_files():
    with open(path, encoding="utf-8", errors="replace") as f:
      for lineno, line in enumerate(f, start=1):
        if trust.search(line):
          offenders.append(f"{path}:{lineno}: {line.strip()}")
        if torch_load.search(line) and "weights_only=True" not in line:
          offenders.append(f"{path}:{lineno}: {line.strip()}")
  assert not offenders, "\n".join(offenders)
