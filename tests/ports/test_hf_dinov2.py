"""DINOv2 / DINOv2-with-registers ports: parity with transformers at the native and other
resolutions, SwiGLU, sharded checkpoints, scanned layers, the RAE recipe, loud errors, and the
forward sharded over 8 simulated devices."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.hf_reference import (edit_safetensors, jitted, pixels, quiet_transformers, save,
                          sharded_forward, torch_vision)

from psvae_jax.models.encoders import preprocess_pixels, rae_features
from psvae_jax.ports import hf
from psvae_jax.ports.common import WeightLoadError

quiet_transformers()
TOL = 1e-4


def _reference(registers: bool, swiglu: bool, image_size: int = 56, seed: int = 0):
  from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                            Dinov2WithRegistersModel)
  torch.manual_seed(seed)
  common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
                image_size=image_size, use_swiglu_ffn=swiglu, layerscale_value=0.7)
  if registers:
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **common))
  else:
    model = Dinov2Model(Dinov2Config(**common))
  with torch.no_grad():  # make the zero-initialised tokens and layer scales non-trivial
    emb = model.embeddings
    emb.cls_token.normal_()
    if registers:
      emb.register_tokens.normal_()
    for layer in model.encoder.layer:
      layer.layer_scale1.lambda1.uniform_(0.2, 1.0)
      layer.layer_scale2.lambda1.uniform_(0.2, 1.0)
  return model.eval()


# (registers, swiglu); both together are covered by the sharded-checkpoint test.
VARIANTS = [(False, False), (True, False), (False, True)]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"reg{int(v[0])}-swiglu{int(v[1])}")
def checkpoint(request, tmp_path_factory):
  registers, swiglu = request.param
  model = _reference(registers, swiglu)
  path = save(model, tmp_path_factory.mktemp("dinov2"))
  return model, path


def test_parity_native_and_other_resolutions(checkpoint):
  model, path = checkpoint
  forward = jitted(hf.load(path))
  for height, width in ((56, 56), (42, 70)):
    x = pixels(2, height, width)
    err = np.abs(np.asarray(forward(x)) - torch_vision(model, x)).max()
    assert err <= TOL, (height, width, err)


@pytest.mark.parametrize("registers", [False, True])
def test_parity_224px_on_checkpoint_configured_at_518px(registers, tmp_path):
  model = _reference(registers, swiglu=False, image_size=518)  # 37x37 position grid
  module = hf.load(save(model, tmp_path))
  x = pixels(1, 224, 224)
  out = np.asarray(jitted(module)(x))
  assert out.shape == (1, (5 if registers else 1) + 16 * 16, 32)
  assert np.abs(out - torch_vision(model, x)).max() <= TOL


def test_sharded_checkpoint_and_scanned_layers(tmp_path):
  model = _reference(registers=True, swiglu=True)
  path = save(model, tmp_path, max_shard_size="20KB")
  assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
  x = pixels(2, 56, 70)
  ref = torch_vision(model, x)
  for scan in (False, True):
    forward = jitted(hf.load(path, scan_layers=scan))
    assert np.abs(np.asarray(forward(x)) - ref).max() <= TOL, scan


def test_bf16_compute_keeps_float32_params(tmp_path):
  model = _reference(registers=True, swiglu=False)
  module = hf.load(save(model, tmp_path), dtype=jnp.bfloat16)
  assert module.pos_embed.get_value().dtype == jnp.float32
  x = pixels(2, 56, 56)
  out = jitted(module)(x)
  assert out.dtype == jnp.bfloat16
  ref = torch_vision(model, x)
  assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.1 * np.abs(ref).max()


def test_rae_features_match_rae_recipe(tmp_path):
  """RAE: transformers' model with the final LayerNorm's affine removed, prefix tokens dropped,
  fed 224 px images resized with torch bicubic and normalised with ImageNet mean/std."""
  model = _reference(registers=True, swiglu=False, image_size=518)
  module = hf.load(save(model, tmp_path))
  images = np.random.default_rng(1).uniform(0, 1, (2, 256, 256, 3)).astype(np.float32)
  torch_images = torch.from_numpy(images).permute(0, 3, 1, 2)
  resized = torch.nn.functional.interpolate(torch_images, size=(224, 224), mode="bicubic",
                                            align_corners=False)
  mean = torch.tensor(module.image_mean).view(1, 3, 1, 1)
  std = torch.tensor(module.image_std).view(1, 3, 1, 1)
  normalised = (resized - mean) / std
  model.layernorm.elementwise_affine = False
  model.layernorm.weight = None
  model.layernorm.bias = None
  with torch.inference_mode():
    ref = model(normalised).last_hidden_state[:, 5:].reshape(2, 16, 16, 32).numpy()

  x = preprocess_pixels(jnp.asarray(images), 224, mean=module.image_mean, std=module.image_std)
  # torch computes fractional source positions in float32 with its own rounding; pixel values
  # agree to ~1e-5 before normalisation (far below 8-bit quantisation).
  assert np.abs(np.asarray(x) - normalised.permute(0, 2, 3, 1).numpy()).max() <= 5e-4
  feats = np.asarray(jitted(module, rae_features)(normalised.permute(0, 2, 3, 1).numpy()))
  assert feats.shape == (2, 16, 16, 32)
  assert np.abs(feats - ref).max() <= TOL


def test_preprocess_uint8_equals_float():
  images = np.random.default_rng(0).integers(0, 256, (1, 30, 40, 3), dtype=np.uint8)
  a = preprocess_pixels(jnp.asarray(images), 28)
  b = preprocess_pixels(jnp.asarray(images.astype(np.float32) / 255.0), 28)
  assert a.shape == (1, 28, 28, 3)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# --- errors ------------------------------------------------------------------------------------


@pytest.fixture
def small_checkpoint(tmp_path):
  return save(_reference(registers=True, swiglu=False), tmp_path / "ckpt")


@pytest.mark.reliability(fault="HF checkpoint of an unsupported model_type",
                         expected="WeightLoadError listing the supported types")
def test_unknown_model_type(small_checkpoint):
  config = os.path.join(small_checkpoint, "config.json")
  with open(config) as f:
    text = f.read()
  with open(config, "w") as f:
    f.write(text.replace('"dinov2_with_registers"', '"vit_mae"'))
  with pytest.raises(WeightLoadError, match=r"vit_mae.*dinov2, dinov2_with_registers, siglip"):
    hf.load(small_checkpoint)


@pytest.mark.reliability(fault="HF weights with missing, extra and mis-shaped tensors",
                         expected="one WeightLoadError listing each")
def test_missing_unexpected_and_misshaped_tensors_in_one_error(small_checkpoint):
  def edit(t):
    del t["encoder.layer.1.norm2.bias"]
    t["encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
    t["layernorm.weight"] = np.ones(31, np.float32)
    q = "encoder.layer.0.attention.attention.query.weight"
    t[q] = t[q][:16]
    return t
  edit_safetensors(small_checkpoint, edit)
  with pytest.raises(WeightLoadError) as info:
    hf.load(small_checkpoint)
  message = str(info.value)
  assert "missing" in message and "encoder.layer.1.norm2.bias" in message
  assert "unexpected" in message and "encoder.layer.0.extra.weight" in message
  assert "mis-shaped" in message and "norm.scale: checkpoint (31,) vs model (32,)" in message
  assert "blocks.blocks.0.attn.qkv.kernel" in message


@pytest.mark.reliability(fault="HF checkpoint with only pytorch_model.bin",
                         expected="refused: pickle")
def test_pickle_weights_refused(small_checkpoint):
  os.remove(os.path.join(small_checkpoint, "model.safetensors"))
  with open(os.path.join(small_checkpoint, "pytorch_model.bin"), "wb") as f:
    f.write(b"not read")
  with pytest.raises(WeightLoadError, match="pickle"):
    hf.load(small_checkpoint)


@pytest.mark.reliability(fault="missing weights directory or config.json",
                         expected="WeightLoadError naming it")
def test_missing_directory_or_config(tmp_path):
  with pytest.raises(WeightLoadError, match="not a checkpoint directory"):
    hf.load(str(tmp_path / "nope"))
  with pytest.raises(WeightLoadError, match="config.json"):
    hf.load(str(tmp_path))


# --- sharded forward ---------------------------------------------------------------------------


def test_forward_sharded_on_8_devices(tmp_path):
  assert jax.device_count() == 8
  model = _reference(registers=True, swiglu=False)
  module = hf.load(save(model, tmp_path))
  x = pixels(8, 56, 56)
  out, state = sharded_forward(module, x)
  kernel = state["blocks"]["blocks"][0]["attn"]["qkv"]["kernel"].get_value()
  assert "fsdp" in str(kernel.sharding.spec)
  assert len(out.sharding.device_set) == 8
  assert np.abs(np.asarray(out) - torch_vision(model, x)).max() <= TOL
