"""diffusers SD3Transformer2DModel -> MMDiT: parity on small random models, strict loading."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from psvae_jax.ports import diffusers as diffusers_port  # noqa: E402
from psvae_jax.ports.common import WeightLoadError, read_json, read_safetensors  # noqa: E402
from psvae_jax.ports.diffusers_sd3 import load_sd3  # noqa: E402

FAST_COMPILE = {"xla_backend_optimization_level": 0}
BASE = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
            pooled_projection_dim=10, out_channels=4, pos_embed_max_size=6, qk_norm=None)


def save_reference(tmp_path, **overrides):
  """A random SD3Transformer2DModel (default init; qk-norm weights perturbed) saved to disk."""
  torch.manual_seed(0)
  model = diffusers.SD3Transformer2DModel(**{**BASE, **overrides}).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight",
                        "norm_added_k.weight")):
        param.copy_(1 + 0.2 * torch.randn_like(param))
  path = str(tmp_path / "sd3")
  model.save_pretrained(path)
  return model, path


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _apply(graph, state, args):
  return nnx.merge(graph, state)(*args)


def check_parity(reference, module, height=8, width=8, text_len=5):
  config = reference.config
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, config.in_channels, height, width)).astype(np.float32)
  text = rng.standard_normal((2, text_len, config.joint_attention_dim)).astype(np.float32)
  pooled = rng.standard_normal((2, config.pooled_projection_dim)).astype(np.float32)
  t = np.array([999.0, 250.5], np.float32)
  with torch.no_grad():
    want = reference(torch.from_numpy(x), torch.from_numpy(text), torch.from_numpy(pooled),
                     torch.from_numpy(t)).sample.numpy()
  graph, state = nnx.split(module)
  got = _apply(graph, state, (jnp.asarray(x.transpose(0, 2, 3, 1)), text, pooled, t))
  err = float(np.abs(np.asarray(got).transpose(0, 3, 1, 2) - want).max())
  assert err <= 1e-4, f"max abs error {err}"
  return err


def test_parity_through_the_dispatcher(tmp_path):
  # Patch 2, no qk norm, a cropped 6x6 position grid, square and non-square inputs.
  reference, path = save_reference(tmp_path)
  module = diffusers_port.load(path)
  check_parity(reference, module)
  check_parity(reference, module, height=8, width=6)


def test_parity_qk_norm_dual_attention_patch1(tmp_path):
  # SD3.5-style: qk RMSNorm and a dual-attention block; patch 1, uncropped sincos positions.
  reference, path = save_reference(tmp_path, patch_size=1, pos_embed_max_size=None,
                                   qk_norm="rms_norm", dual_attention_layers=(0,))
  module = load_sd3(path, read_json(os.path.join(path, "config.json")), read_safetensors(path))
  check_parity(reference, module)


@pytest.mark.slow
def test_parity_scanned_layers(tmp_path):
  reference, path = save_reference(tmp_path, num_layers=4, qk_norm="rms_norm",
                                   dual_attention_layers=(0, 3))
  module = load_sd3(path, read_json(os.path.join(path, "config.json")), read_safetensors(path),
                    scan_layers=True)
  assert len(module.block_groups) == 2
  check_parity(reference, module)


@pytest.mark.reliability(fault="SD3 weights: wrong config, missing, extra, mis-shaped tensors",
                         expected="WeightLoadError naming each")
def test_strict_loading_errors(tmp_path):
  _, path = save_reference(tmp_path, num_layers=2)
  config = read_json(os.path.join(path, "config.json"))
  tensors = read_safetensors(path)
  with pytest.raises(WeightLoadError, match="caption_projection_dim"):
    load_sd3(path, {**config, "caption_projection_dim": 8}, tensors)
  with pytest.raises(WeightLoadError, match="qk_norm"):
    load_sd3(path, {**config, "qk_norm": "layer_norm"}, tensors)
  missing = {k: v for k, v in tensors.items() if k != "transformer_blocks.0.attn.to_k.bias"}
  with pytest.raises(WeightLoadError, match="transformer_blocks.0.attn.to_k.bias"):
    load_sd3(path, config, missing)
  extra = {**tensors, "transformer_blocks.0.attn.surprise": np.zeros(3, np.float32)}
  with pytest.raises(WeightLoadError, match="surprise"):
    load_sd3(path, config, extra)
  with pytest.raises(WeightLoadError, match="pos_embed.pos_embed"):
    load_sd3(path, config, {**tensors, "pos_embed.pos_embed": tensors["pos_embed.pos_embed"] + 1})
