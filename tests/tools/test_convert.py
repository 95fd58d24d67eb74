"""The converter: a transformers checkpoint -> DIR/port_config.json + DIR/params (Orbax), and
restoring it (unscanned, scanned, sharded) with loud errors on structure or shape mismatches."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from psvae_jax.models.encoders import EncoderConfig, VisionEncoder
from psvae_jax.ports import converted, hf
from psvae_jax.ports.common import WeightLoadError

from helpers.hf_reference import jitted, pixels, quiet_transformers, save

quiet_transformers()
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="module")
def dinov2_checkpoint(tmp_path_factory):
  import torch
  from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
  torch.manual_seed(0)
  model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=56,
      num_register_tokens=4)).eval()
  return save(model, tmp_path_factory.mktemp("src"))


def test_cli_writes_config_and_params_and_restores_exactly(dinov2_checkpoint, tmp_path):
  out = tmp_path / "converted"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(
      [sys.executable, "-m", "psvae_jax.tools.convert", f"--src={dinov2_checkpoint}",
       f"--out={out}"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  port_config = json.loads((out / "port_config.json").read_text())
  assert port_config["model_type"] == "dinov2_with_registers" and port_config["kind"] == "vision"
  assert port_config["config"]["num_register_tokens"] == 4
  assert (out / "params").is_dir()

  direct = hf.load(dinov2_checkpoint)
  x = pixels(2, 56, 56)
  ref = np.asarray(jitted(direct)(x))
  restored = converted.load_converted(str(out))
  assert np.array_equal(np.asarray(jitted(restored)(x)), ref)
  scanned = converted.load_converted(str(out), scan_layers=True)
  assert np.abs(np.asarray(jitted(scanned)(x)) - ref).max() <= 1e-5


def test_restore_sharded_on_mesh(dinov2_checkpoint, tmp_path):
  from psvae_jax.sharding import make_mesh, state_shardings
  from psvae_jax.tools.convert import convert
  convert(dinov2_checkpoint, str(tmp_path / "c"))
  mesh = make_mesh({"data": 2, "fsdp": 4})
  module = converted.load_converted(str(tmp_path / "c"),
                                    shardings=lambda state: state_shardings(state, mesh))
  kernel = module.blocks.blocks[0].attn.qkv.kernel.get_value()
  assert kernel.sharding.spec[0] == "fsdp"
  reference = hf.load(dinov2_checkpoint).blocks.blocks[0].attn.qkv.kernel.get_value()
  assert np.array_equal(np.asarray(kernel), np.asarray(reference))


@pytest.mark.reliability(fault="converted weights for another encoder shape",
                         expected="WeightLoadError: missing, unexpected, mis-shaped entries")
def test_restore_mismatch_names_entries(dinov2_checkpoint, tmp_path):
  from psvae_jax.tools.convert import convert
  convert(dinov2_checkpoint, str(tmp_path / "c"))
  config = converted.config_from_port_config(
      json.loads((tmp_path / "c" / "port_config.json").read_text()))
  other = EncoderConfig(**{**config.to_dict(), "depth": 3, "width": 48, "num_register_tokens": 0})
  module = nnx.eval_shape(lambda: VisionEncoder(other, rngs=nnx.Rngs(0)))
  with pytest.raises(WeightLoadError) as info:
    converted.restore_params(module, str(tmp_path / "c"))
  message = str(info.value)
  assert "missing in checkpoint: blocks.blocks.2." in message
  assert "unexpected in checkpoint: register_tokens" in message
  assert "mis-shaped" in message and "norm.scale: checkpoint (32,) vs model (48,)" in message
  with pytest.raises(WeightLoadError, match="no 'params' checkpoint"):
    converted.restore_params(module, str(tmp_path))
