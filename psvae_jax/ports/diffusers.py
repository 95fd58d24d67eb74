"""Ports of local diffusers model directories (config.json + safetensors) to NNX modules.

`load(path)` dispatches on the config's `_class_name`:
  AutoencoderKL           the decoder side only (post_quant_conv + decoder) as a
                          `psvae_jax.models.pixel_decoder.PixelDecoder`; `module.decode(z)` with
                          NHWC z returns diffusers' `vae.decode(z).sample` in NHWC. As in
                          diffusers, `decode` does not apply `scaling_factor` / `shift_factor`:
                          pass z = latents / scaling_factor (+ shift_factor) yourself.
                          Encoder and quant_conv tensors are deliberately ignored.
  SD3Transformer2DModel   delegated to `psvae_jax.ports.diffusers_sd3.load_sd3(path, config,
                          tensors, *, dtype)`.
Weights stay float32; `dtype` is the modules' compute dtype. The AutoencoderKL decoder is
built abstractly (no random init) and its parameters are host numpy arrays: place them with
`jax.device_put` (e.g. with `psvae_jax.sharding.state_shardings`) before heavy use.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.ports import diffusers_sd3
from psvae_jax.ports.common import (TensorPool, WeightLoadError, assign, read_json,
                                    read_safetensors)
from psvae_jax.tree_paths import path_str

Dtype = Any

UP_BLOCK_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def _load_autoencoder_kl(path: str, config: dict, tensors: dict[str, np.ndarray], *,
                         dtype: Dtype) -> nnx.Module:
  from psvae_jax.models.pixel_decoder import PixelDecoder
  kwargs = _pixel_decoder_kwargs(path, config)
  # Abstract construction (no random init): every parameter is then set from the checkpoint.
  decoder = nnx.eval_shape(lambda: PixelDecoder(**kwargs, dtype=dtype, param_dtype=jnp.float32,
                                                rngs=nnx.Rngs(0)))
  targets, pool = autoencoder_kl_targets(decoder, tensors, path=path)
  assign(decoder, targets, pool, what=f"AutoencoderKL decoder from {path}")
  return decoder


def autoencoder_kl_targets(decoder: nnx.Module, tensors: dict[str, np.ndarray], *,
                           path: str = "checkpoint") -> tuple[dict, TensorPool]:
  """Maps AutoencoderKL tensors to {PixelDecoder param path: array} for every parameter of
  `decoder` (encoder-side tensors are ignored)."""
  pool = TensorPool(tensors, source=path)
  pool.ignore(lambda n: n.startswith(("encoder.", "quant_conv.")))
  targets = {}
  for key_path, _ in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
    name = path_str(key_path)
    source, transform = _autoencoder_kl_source(name, pool)
    array = pool.take(source)
    targets[name] = None if array is None else transform(array)
  return targets, pool


def _pixel_decoder_kwargs(path: str, config: dict) -> dict:
  """PixelDecoder arguments equivalent to a diffusers AutoencoderKL config (decoder side)."""

  def get(key, default):
    return config.get(key, default)

  act = get("act_fn", "silu")
  if act not in ("silu", "swish"):
    raise WeightLoadError(f"{path}: AutoencoderKL act_fn={act!r} is not supported (only 'silu')")
  channels = [int(c) for c in get("block_out_channels", (64,))]
  up_types = list(get("up_block_types", ("UpDecoderBlock2D",)))
  if len(up_types) != len(channels):
    raise WeightLoadError(f"{path}: {len(up_types)} up_block_types for {len(channels)} "
                          "block_out_channels")
  unknown = sorted(set(up_types) - set(UP_BLOCK_TYPES))
  if unknown:
    raise WeightLoadError(f"{path}: unsupported up_block_types {unknown}; supported: "
                          f"{sorted(UP_BLOCK_TYPES)}")
  levels = len(channels)
  sample_size = get("sample_size", 32)
  resolution = int(sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size)
  if resolution < 2 ** (levels - 1):
    raise WeightLoadError(f"{path}: sample_size {sample_size} is too small for {levels} levels")
  # diffusers' up_blocks[i] is LDM level (levels - 1 - i), at resolution // 2**level.
  attn_resolutions = tuple(resolution // 2 ** (levels - 1 - i)
                           for i, t in enumerate(up_types) if UP_BLOCK_TYPES[t])
  ch = math.gcd(*channels)
  return dict(z_channels=int(get("latent_channels", 4)), out_ch=int(get("out_channels", 3)),
              ch=ch, ch_mult=tuple(c // ch for c in channels),
              num_res_blocks=int(get("layers_per_block", 1)), attn_resolutions=attn_resolutions,
              resolution=resolution, use_post_quant_conv=bool(get("use_post_quant_conv", True)),
              mid_attention=bool(get("mid_block_add_attention", True)),
              norm_groups=int(get("norm_num_groups", 32)))


# Attention projections in checkpoints written before diffusers renamed them.
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _autoencoder_kl_source(name: str, pool: TensorPool) -> tuple[str, Callable]:
  """diffusers tensor name and layout transform for one PixelDecoder parameter path."""
  module, leaf = name.rsplit(".", 1)
  if not module.startswith("post_quant_conv"):
    module = "decoder." + module
  module = (module.replace("mid_block.attention.", "mid_block.attentions.0.")
            .replace(".upsampler.conv", ".upsamplers.0.conv")
            .replace(".to_out", ".to_out.0"))
  leaf_name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  source = f"{module}.{leaf_name}"
  if source not in pool:
    for new, old in _LEGACY_ATTENTION.items():
      if module.endswith("." + new) and f"{module[:-len(new)]}{old}.{leaf_name}" in pool:
        source = f"{module[:-len(new)]}{old}.{leaf_name}"
  return source, (_kernel_layout if leaf == "kernel" else np.asarray)


def _kernel_layout(w: np.ndarray) -> np.ndarray:
  """torch (out, in) / (out, in, kh, kw) -> flax (in, out) / (kh, kw, in, out)."""
  if w.ndim == 4:
    return np.transpose(w, (2, 3, 1, 0))
  if w.ndim == 2:
    return np.transpose(w)
  raise WeightLoadError(f"unexpected kernel rank {w.ndim} (shape {w.shape})")


def _load_sd3(path: str, config: dict, tensors: dict[str, np.ndarray], *,
              dtype: Dtype) -> nnx.Module:
  return diffusers_sd3.load_sd3(path, config, tensors, dtype=dtype)


# _class_name -> loader(path, config, tensors, *, dtype) -> nnx.Module
LOADERS: dict[str, Callable[..., nnx.Module]] = {
    "AutoencoderKL": _load_autoencoder_kl,
    "SD3Transformer2DModel": _load_sd3,
}


def load(path: str, *, dtype: Dtype = jnp.float32) -> nnx.Module:
  """Loads a local diffusers model directory as an NNX module (see the module docstring)."""
  config = read_json(os.path.join(path, "config.json"))
  class_name = config.get("_class_name")
  loader = LOADERS.get(class_name)
  if loader is None:
    raise WeightLoadError(f"{path}: diffusers _class_name {class_name!r} is not supported; "
                          f"supported: {sorted(LOADERS)}")
  return loader(path, config, read_safetensors(path), dtype=dtype)
