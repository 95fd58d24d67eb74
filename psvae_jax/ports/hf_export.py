"""Vision encoders -> transformers checkpoint directories (the inverse of `psvae_jax.ports.hf`).

`encoder_hf_config(config)` is the config.json dict of the transformers model that
`hf.module_config` maps back to exactly `config` (DINOv2 -> `dinov2` / `dinov2_with_registers`,
SigLIP -> `siglip_vision_model` without the pooling head); a config it cannot express is a
WeightLoadError naming the fields. `encoder_tensors` inverts `hf.checkpoint_targets` through
`psvae_jax.ports.inverse`. Needs torch and transformers (the reference model's tensor names and
shapes are read from an instance on torch's meta device: nothing is allocated).
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from psvae_jax.models.encoders import EncoderConfig
from psvae_jax.ports import hf
from psvae_jax.ports.common import WeightLoadError
from psvae_jax.ports.inverse import flat_params, invert, zeros_or_ones

MODEL_CLASSES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
                 "siglip_vision_model": "SiglipVisionModel"}
_HF_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def encoder_hf_config(config: EncoderConfig, *, what: str = "the encoder") -> dict:
  """The transformers config.json dict equivalent to `config` (checked by mapping it back)."""
  if config.mlp_type not in ("swiglu",) + tuple(_HF_ACTS):
    raise WeightLoadError(f"{what}: mlp_type {config.mlp_type!r} has no transformers form")
  act = _HF_ACTS.get(config.mlp_type, "gelu")
  common = dict(hidden_size=config.width, num_hidden_layers=config.depth,
                num_attention_heads=config.num_heads, patch_size=config.patch_size,
                image_size=config.image_size, num_channels=config.num_channels,
                layer_norm_eps=config.norm_eps, hidden_act=act)
  if config.family == "dinov2":
    swiglu = config.mlp_type == "swiglu"
    ratio = 4 if swiglu else config.mlp_dim / config.width
    d = dict(model_type="dinov2_with_registers" if config.num_register_tokens else "dinov2",
             **common, mlp_ratio=int(ratio) if float(ratio).is_integer() else ratio,
             use_swiglu_ffn=swiglu, qkv_bias=config.qkv_bias,
             layerscale_value=config.layer_scale_init)
    if config.num_register_tokens:
      d["num_register_tokens"] = config.num_register_tokens
  else:
    d = dict(model_type="siglip_vision_model", **common,
             intermediate_size=config.mlp_dim, vision_use_head=False)
  d["architectures"] = [MODEL_CLASSES[d["model_type"]]]
  try:
    back = hf.module_config(d, what)
  except (WeightLoadError, TypeError, ValueError) as e:
    raise WeightLoadError(f"{what} has no transformers form: {e}") from e
  if back != config:
    differ = [f.name for f in dataclasses.fields(config)
              if getattr(back, f.name) != getattr(config, f.name)]
    raise WeightLoadError(f"{what} has no transformers {d['model_type']} form: it differs in "
                          f"{', '.join(differ)}")
  return d


def reference_shapes(hf_config: dict, *, layers_only: int | None = None) -> dict:
  """{tensor name: shape} of the transformers model for `hf_config` (meta device), or with
  `layers_only=N` of N bare encoder layers named '<i>.<...>'."""
  import torch
  import transformers

  config = transformers.AutoConfig.for_model(**hf_config)
  with torch.device("meta"):
    if layers_only is None:
      model = getattr(transformers, MODEL_CLASSES[hf_config["model_type"]])(config)
    else:
      model = torch.nn.ModuleList([layer_class(hf_config["model_type"])(config)
                                   for _ in range(layers_only)])
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def layer_class(model_type: str):
  if model_type == "dinov2":
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer
    return Dinov2Layer
  if model_type == "dinov2_with_registers":
    from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
        Dinov2WithRegistersLayer)
    return Dinov2WithRegistersLayer
  from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer
  return SiglipEncoderLayer


def encoder_tensors(encoder, hf_config: dict, *, scan_layers: bool = False) -> dict:
  """{transformers tensor name: float32 array} of a VisionEncoder (the mask token, unused
  outside masked pretraining, is zero)."""
  what = f"the encoder as {hf_config['model_type']}"
  return invert(lambda t: hf.checkpoint_targets(t, hf_config, encoder.config, path=what,
                                                scan_layers=scan_layers),
                reference_shapes(hf_config), flat_params(encoder), what=what,
                unused=zeros_or_ones)


def layer_stack_tensors(stack_params: dict, config: EncoderConfig, depth: int, *,
                        what: str) -> tuple[dict, dict]:
  """(tensors named '<i>.<...>' of `depth` transformers layers, their config.json dict) for
  TransformerStack parameters {'blocks.<i>.<...>': array} of blocks shaped like `config`."""
  layer_config = dataclasses.replace(config, depth=depth)
  hf_config = encoder_hf_config(layer_config, what=what)
  tensors = invert(lambda t: hf.layer_stack_targets(t, layer_config, depth, src="",
                                                    dst="blocks", path=what),
                   reference_shapes(hf_config, layers_only=depth), stack_params, what=what)
  return tensors, hf_config


def save_transformers_dir(out: str, hf_config: dict, tensors: dict,
                          metadata: dict | None = None) -> list[str]:
  """Writes config.json + model.safetensors (+ psvae_export.json with `metadata`)."""
  import transformers
  from safetensors.numpy import save_file

  os.makedirs(out, exist_ok=True)
  transformers.AutoConfig.for_model(**hf_config).save_pretrained(out)
  weights = os.path.join(out, "model.safetensors")
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, weights,
            metadata={"format": "pt"})
  files = [os.path.join(out, "config.json"), weights]
  if metadata:
    files.append(os.path.join(out, "psvae_export.json"))
    with open(files[-1], "w") as f:
      json.dump(metadata, f, indent=2)
  return files
