"""SigLIP ports: a full SiglipModel checkpoint (vision tower taken, text tower ignored) and a
SiglipVisionModel checkpoint, at the native resolution and an interpolated one."""
import numpy as np
import pytest
import torch
from helpers.hf_reference import edit_safetensors, jitted, pixels, quiet_transformers, save, torch_vision

from psvae_jax.models.encoders import SIGLIP_MEAN
from psvae_jax.ports import hf
from psvae_jax.ports.common import WeightLoadError

quiet_transformers()
TOL = 1e-4
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              image_size=56, patch_size=14)


@pytest.fixture(scope="module")
def full_model(tmp_path_factory):
  from transformers import SiglipConfig, SiglipModel
  torch.manual_seed(0)
  config = SiglipConfig(
      text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=24, vocab_size=64, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0),
      vision_config=VISION)
  model = SiglipModel(config).eval()
  return model, save(model, tmp_path_factory.mktemp("siglip"))


def test_full_model_vision_tower_parity(full_model):
  model, path = full_model
  module = hf.load(path)
  assert module.num_prefix_tokens == 0 and module.image_mean == SIGLIP_MEAN
  forward = jitted(module)
  x = pixels(2, 56, 56)
  assert np.abs(np.asarray(forward(x)) - torch_vision(model.vision_model, x)).max() <= TOL
  x = pixels(2, 70, 42)  # other resolution: transformers needs interpolate_pos_encoding=True
  ref = torch_vision(model.vision_model, x, interpolate_pos_encoding=True)
  assert np.abs(np.asarray(forward(x)) - ref).max() <= TOL


def test_vision_model_checkpoint_parity(tmp_path):
  from transformers import SiglipVisionConfig, SiglipVisionModel
  torch.manual_seed(1)
  model = SiglipVisionModel(SiglipVisionConfig(**VISION)).eval()
  forward = jitted(hf.load(save(model, tmp_path)))
  x = pixels(2, 84, 84)
  ref = torch_vision(model, x, interpolate_pos_encoding=True)
  assert np.abs(np.asarray(forward(x)) - ref).max() <= TOL


@pytest.mark.reliability(fault="SigLIP weights missing a vision tensor",
                         expected="WeightLoadError naming it")
def test_missing_vision_tensor_named(full_model, tmp_path):
  import shutil
  model, path = full_model
  copy = shutil.copytree(path, tmp_path / "copy")

  def edit(t):
    del t["vision_model.encoder.layers.1.mlp.fc2.weight"]
    return t
  edit_safetensors(str(copy), edit)
  with pytest.raises(WeightLoadError, match=r"missing.*vision_model.encoder.layers.1.mlp.fc2"):
    hf.load(str(copy))
