"""diffusers AutoencoderKL (random small config, 96 latent channels) -> PixelDecoder parity."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import psvae_jax  # noqa: F401
from psvae_jax.models.pixel_decoder import PixelDecoder
from psvae_jax.ports import diffusers as diffusers_port
from psvae_jax.ports import diffusers_sd3 as sd3
from psvae_jax.ports.common import WeightLoadError

diffusers = pytest.importorskip("diffusers")


def _randomise(module: torch.nn.Module, seed: int) -> None:
  """Perturbs every 1-D parameter so GroupNorm scales/biases are not the init's ones/zeros."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _save_vae(tmp_path, *, attention_up: bool, post_quant: bool, seed: int = 0):
  up_types = (("AttnUpDecoderBlock2D" if attention_up else "UpDecoderBlock2D"),
              "UpDecoderBlock2D")
  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=up_types, block_out_channels=(32, 64), layers_per_block=1,
      latent_channels=96, norm_num_groups=32, sample_size=32, use_post_quant_conv=post_quant)
  _randomise(vae, seed)
  vae.eval()
  vae.save_pretrained(tmp_path, safe_serialization=True)
  return vae


@pytest.mark.parametrize("attention_up,post_quant", [(True, True), (False, False)])
def test_decode_matches_diffusers(tmp_path, attention_up, post_quant):
  vae = _save_vae(tmp_path, attention_up=attention_up, post_quant=post_quant)
  module = diffusers_port.load(str(tmp_path))
  assert isinstance(module, PixelDecoder)
  # diffusers' up_blocks[0] is the lowest resolution: AttnUpDecoderBlock2D when attention_up.
  assert (module.up_blocks[0].attentions is not None) == attention_up
  assert module.up_blocks[1].attentions is None
  assert (module.post_quant_conv is not None) == post_quant
  z = np.random.default_rng(1).standard_normal((2, 96, 6, 5)).astype(np.float32)
  with torch.no_grad():
    ref = vae.decode(torch.from_numpy(z)).sample.numpy()
  out = np.asarray(jax.jit(lambda m, x: m.decode(x))(module, jnp.asarray(z.transpose(0, 2, 3, 1))))
  assert out.shape == (2, 12, 10, 3)
  err = np.abs(out - ref.transpose(0, 2, 3, 1)).max()
  assert err <= 1e-4, err


def test_unknown_class_names_supported(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
  with pytest.raises(WeightLoadError, match="AutoencoderKL.*SD3Transformer2DModel"):
    diffusers_port.load(str(tmp_path))


def test_sd3_dispatches_to_its_port(tmp_path, monkeypatch):
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
  from safetensors.numpy import save_file
  save_file({"x": np.zeros((1,), np.float32)},
            str(tmp_path / "diffusion_pytorch_model.safetensors"))
  calls = []
  monkeypatch.setattr(sd3, "load_sd3",
                      lambda path, config, tensors, *, dtype: calls.append((path, sorted(tensors))))
  diffusers_port.load(str(tmp_path))
  assert calls == [(str(tmp_path), ["x"])]


@pytest.mark.reliability(fault="diffusers VAE weights not matching its config",
                         expected="WeightLoadError: missing tensors")
def test_mismatched_checkpoint_fails_loudly(tmp_path):
  _save_vae(tmp_path, attention_up=False, post_quant=True)
  config = json.loads((tmp_path / "config.json").read_text())
  config["layers_per_block"] = 2  # the weights have 1 -> missing tensors
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(WeightLoadError, match="missing"):
    diffusers_port.load(str(tmp_path))


def test_legacy_attention_names_load(tmp_path):
  """Checkpoints saved before diffusers renamed attention projections (query/key/value/
  proj_attn) load to the same parameters."""
  from safetensors.numpy import load_file, save_file
  _save_vae(tmp_path, attention_up=True, post_quant=True)
  reference = diffusers_port.load(str(tmp_path))
  weights_file = str(tmp_path / "diffusion_pytorch_model.safetensors")
  renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
             ".to_out.0.": ".proj_attn."}
  legacy = {}
  for name, value in load_file(weights_file).items():
    for new, old in renames.items():
      name = name.replace(new, old)
    legacy[name] = value
  assert any(".proj_attn." in n for n in legacy)
  save_file(legacy, weights_file)
  module = diffusers_port.load(str(tmp_path))
  np.testing.assert_array_equal(np.asarray(module.mid_block.attention.to_out.kernel[...]),
                                np.asarray(reference.mid_block.attention.to_out.kernel[...]))
