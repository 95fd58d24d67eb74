"""A whole S-VAE / PS-VAE autoencoder as one safetensors file + a JSON config for PyTorch.

Tensor groups (names) and the PyTorch modules that load them (`load_state_dict` of the group
with its prefix removed):
  encoder.*            transformers Dinov2Model / Dinov2WithRegistersModel / SiglipVisionModel
                       built from config['encoder']['config'] (`hf_export`)
  semantic_encoder.layers.*, semantic_decoder.layers.*
                       torch.nn.ModuleList of config['semantic_vae']['depth'] transformers
                       layers (Dinov2Layer / Dinov2WithRegistersLayer / SiglipEncoderLayer) of
                       config['semantic_vae']['layer_config']
  semantic_encoder.proj.*  nn.Sequential(Linear(D, D), GELU(), Linear(D, 2C)): mean, logvar
  semantic_decoder.proj.*  nn.Sequential(Linear(C, D), GELU(), Linear(D, D))
  pixel_decoder.*      diffusers.models.autoencoders.vae.Decoder(**config['pixel_decoder'])
  latent_stats.mean / .std  per-channel statistics of the posterior mean (when the run has them)
The forward pass is in config['recipe']. Training-only networks (teacher, LPIPS, discriminator)
are not exported.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from psvae_jax.ports import diffusers_export, hf_export
from psvae_jax.ports.inverse import flat_params

RECIPE = (
    "images uint8 (N, S, S, 3) -> float /255, bicubic resize to encoder_resolution "
    "(align_corners=False, no antialias), (x - image_mean) / image_std; "
    "features = encoder(...).hidden_states[-1] (before the final LayerNorm), prefix tokens "
    "dropped, LayerNorm without affine (eps = encoder layer_norm_eps); "
    "E_s: semantic_encoder.layers then semantic_encoder.proj -> (mean, logvar) split in half on "
    "channels, z = mean; D_s: semantic_decoder.proj then semantic_decoder.layers -> features; "
    "pixels = pixel_decoder(z as NCHW) in [-1, 1]; generators use (z - latent_stats.mean) / "
    "latent_stats.std")


def _sequential(params: dict, prefix: str, out_prefix: str) -> dict:
  """ProjectionMLP fc1/fc2 (kernel (in, out)) -> torch Sequential '0.' / '2.' Linear tensors."""
  out = {}
  for ours, theirs in (("fc1", "0"), ("fc2", "2")):
    out[f"{out_prefix}.{theirs}.weight"] = params[f"{prefix}.{ours}.kernel"].T
    out[f"{out_prefix}.{theirs}.bias"] = params[f"{prefix}.{ours}.bias"]
  return out


def autoencoder_tensors(model, model_config, *, image_size: int,
                        latent_stats: dict | None) -> tuple[dict, dict]:
  """(tensors, config) of the whole autoencoder (see the module docstring)."""
  encoder = model.encoder
  enc_hf = hf_export.encoder_hf_config(encoder.config)
  tensors = {f"encoder.{k}": v for k, v in hf_export.encoder_tensors(encoder, enc_hf).items()}
  svae = flat_params(model.svae)
  depth = int(model_config.svae_depth)
  # E_s / D_s blocks have the encoder's shape with a plain GELU MLP and q/k/v biases.
  layer = dataclasses.replace(encoder.config, mlp_type="gelu", qkv_bias=True)
  layer_hf = None
  for part, ours in (("semantic_encoder", "enc_blocks"), ("semantic_decoder", "dec_blocks")):
    stack = {k[len(ours) + 1:]: v for k, v in svae.items() if k.startswith(f"{ours}.")}
    layers, layer_hf = hf_export.layer_stack_tensors(stack, layer, depth,
                                                     what=f"the semantic VAE's {ours}")
    tensors.update({f"{part}.layers.{k}": v for k, v in layers.items()})
  tensors.update(_sequential(svae, "enc_proj", "semantic_encoder.proj"))
  tensors.update(_sequential(svae, "dec_proj", "semantic_decoder.proj"))
  decoder_args = diffusers_export.decoder_arguments(model.pixel_decoder)
  tensors.update({f"pixel_decoder.{k}": v for k, v in diffusers_export.decoder_tensors(
      model.pixel_decoder, decoder_args).items()})
  if latent_stats:
    tensors["latent_stats.mean"] = np.asarray(latent_stats["mean"], np.float32)
    tensors["latent_stats.std"] = np.asarray(latent_stats["std"], np.float32)
  config = {
      "encoder": {"class": f"transformers.{enc_hf['architectures'][0]}", "config": enc_hf},
      "semantic_vae": {"depth": depth, "width": int(encoder.config.width),
                       "latent_channels": int(model_config.latent_channels),
                       "layer_class": hf_export.layer_class(layer_hf["model_type"]).__name__,
                       "layer_config": layer_hf, "projection_activation": "gelu (erf)"},
      "pixel_decoder": decoder_args,
      "pixel_decoder_class": diffusers_export.DECODER_CLASS,
      "image_size": int(image_size), "encoder_resolution": int(model_config.encoder_resolution),
      "image_mean": list(encoder.config.image_mean), "image_std": list(encoder.config.image_std),
      "latent_stats": bool(latent_stats), "recipe": RECIPE,
  }
  return tensors, config


def save_autoencoder(out: str, model, model_config, *, image_size: int,
                     latent_stats: dict | None, metadata: dict) -> list[str]:
  """Writes OUT/autoencoder.safetensors and OUT/autoencoder_config.json; returns their paths."""
  from safetensors.numpy import save_file

  tensors, config = autoencoder_tensors(model, model_config, image_size=image_size,
                                        latent_stats=latent_stats)
  os.makedirs(out, exist_ok=True)
  files = [os.path.join(out, "autoencoder.safetensors"),
           os.path.join(out, "autoencoder_config.json")]
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, files[0],
            metadata={"format": "pt"})
  with open(files[1], "w") as f:
    json.dump({**config, "export": metadata}, f, indent=2)
  return files
