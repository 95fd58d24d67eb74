"""Pixel decoders and MMDiTs -> diffusers layouts (the inverse of `psvae_jax.ports.diffusers`
and `psvae_jax.ports.diffusers_sd3`).

  pixel decoder -> diffusers' VAE `Decoder` (diffusers.models.autoencoders.vae.Decoder): its
                   constructor arguments and state dict (the decoder half of AutoencoderKL,
                   without post_quant_conv, which the PS-VAE decoder does not have).
  MMDiT         -> `SD3Transformer2DModel` config and state dict, when the MMDiT is one
                   (`sd3_config` names what is not representable otherwise).
Both inverses are derived from the forward maps (`psvae_jax.ports.inverse`); the SD3 config is
checked by mapping it back to the MMDiT's own, the Decoder's by every tensor's name and shape.
Needs torch and diffusers (the reference
tensor names and shapes come from an instance on torch's meta device).
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from psvae_jax.models.mmdit import MMDiTConfig, sincos_pos_embed_2d
from psvae_jax.ports import diffusers as diffusers_port
from psvae_jax.ports import diffusers_sd3
from psvae_jax.ports.common import WeightLoadError
from psvae_jax.ports.inverse import flat_params, invert, zeros_or_ones

DECODER_CLASS = "diffusers.models.autoencoders.vae.Decoder"
# MMDiTConfig fields SD3Transformer2DModel has no form for, in words.
_NOT_SD3 = {"ddt_head": "a DDT head (config.model.ddt_head=True)",
            "pos_embed": "learned position embeddings (SD3's are fixed sincos)",
            "causal_text": "a causal text mask",
            "edit": "source-image tokens (an edit model)",
            "edit_position_std": "learned edit position codes",
            "mlp_ratio": "an MLP ratio other than 4",
            "timestep_embed_dim": "a timestep embedding other than 256 wide"}


# --- the pixel decoder -----------------------------------------------------------------------

def decoder_arguments(decoder) -> dict:
  """diffusers `Decoder(**arguments)` of a PixelDecoder's shape (`decoder_tensors` then checks
  every tensor name and shape against it)."""
  levels = decoder.num_levels
  up_blocks = list(decoder.up_blocks)
  channels = [int(up.resnets[0].conv2.out_features) for up in up_blocks][::-1]  # level order
  if decoder.post_quant_conv is not None:
    raise WeightLoadError("the pixel decoder has a post_quant_conv, which diffusers' Decoder "
                          "does not hold (export it as part of an AutoencoderKL instead)")
  args = dict(in_channels=int(decoder.z_channels),
              out_channels=int(decoder.conv_out.out_features),
              up_block_types=["AttnUpDecoderBlock2D" if up.attentions is not None
                              else "UpDecoderBlock2D" for up in up_blocks],
              block_out_channels=channels, layers_per_block=len(up_blocks[0].resnets) - 1,
              norm_num_groups=int(decoder.conv_norm_out.num_groups), act_fn="silu",
              mid_block_add_attention=decoder.mid_block.attention is not None)
  if len(channels) != levels:
    raise WeightLoadError(f"pixel decoder: {len(channels)} up blocks for {levels} levels")
  return args


def decoder_tensors(decoder, arguments: dict) -> dict:
  """{Decoder state-dict name: float32 array} of a PixelDecoder."""
  import torch
  from diffusers.models.autoencoders.vae import Decoder

  with torch.device("meta"):
    shapes = {f"decoder.{k}": tuple(v.shape) for k, v in Decoder(**arguments).state_dict().items()}
  tensors = invert(lambda t: diffusers_port.autoencoder_kl_targets(decoder, t, path="Decoder"),
                   shapes, flat_params(decoder), what="the pixel decoder as diffusers' Decoder")
  return {k[len("decoder."):]: v for k, v in tensors.items()}


# --- the MMDiT -------------------------------------------------------------------------------

def sd3_config(config: MMDiTConfig) -> dict:
  """SD3Transformer2DModel arguments equivalent to `config`; WeightLoadError naming what an
  SD3 transformer cannot express otherwise."""
  args = dict(sample_size=config.sample_size, patch_size=config.patch_size,
              in_channels=config.in_channels, num_layers=config.num_layers,
              attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
              joint_attention_dim=config.text_dim, caption_projection_dim=config.width,
              pooled_projection_dim=config.pooled_dim, out_channels=config.out_dim,
              pos_embed_max_size=config.pos_embed_max_size,
              dual_attention_layers=list(config.dual_attention_layers),
              qk_norm=config.qk_norm)
  back = diffusers_sd3.sd3_mmdit_config(args, path="SD3Transformer2DModel")
  # out_channels None and equal to in_channels mean the same model.
  back = dataclasses.replace(back, out_channels=config.out_channels)
  differ = [f.name for f in dataclasses.fields(config)
            if getattr(back, f.name) != getattr(config, f.name)]
  if differ:
    raise WeightLoadError("the generator is not representable as diffusers' "
                          "SD3Transformer2DModel: it has "
                          + "; ".join(_NOT_SD3.get(name, f"a different {name}") for name in differ))
  return args


def sd3_tensors(mmdit, args: dict, *, scan_layers: bool = False) -> dict:
  """{SD3Transformer2DModel state-dict name: float32 array} of an MMDiT (the last block's
  text-query weights, which only feed SD3's discarded text output, are zero / one)."""
  import torch
  from diffusers import SD3Transformer2DModel

  cfg = mmdit.config
  with torch.device("meta"):
    shapes = {k: tuple(v.shape) for k, v in SD3Transformer2DModel(**args).state_dict().items()}
  fixed = {}
  if "pos_embed.pos_embed" in shapes:
    side = cfg.pos_embed_max_size or cfg.base_grid
    table = sincos_pos_embed_2d(cfg.width, side, side, cfg.base_grid)
    fixed["pos_embed.pos_embed"] = np.asarray(table, np.float32).reshape(
        shapes["pos_embed.pos_embed"])
  return invert(lambda t: diffusers_sd3.sd3_targets(t, cfg, path="SD3Transformer2DModel",
                                                    scan_layers=scan_layers),
                shapes, flat_params(mmdit), what="the generator as SD3Transformer2DModel",
                fixed=fixed, unused=zeros_or_ones)


def save_sd3_dir(out: str, args: dict, tensors: dict) -> list[str]:
  """Writes an SD3Transformer2DModel directory (config.json +
  diffusion_pytorch_model.safetensors) that `from_pretrained` loads."""
  import torch
  from diffusers import SD3Transformer2DModel
  from safetensors.numpy import save_file

  os.makedirs(out, exist_ok=True)
  with torch.device("meta"):
    SD3Transformer2DModel(**args).save_config(out)
  weights = os.path.join(out, "diffusion_pytorch_model.safetensors")
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, weights,
            metadata={"format": "pt"})
  return [os.path.join(out, "config.json"), weights]


def save_decoder_dir(out: str, arguments: dict, tensors: dict,
                     latent_stats: dict | None = None) -> list[str]:
  """Writes decoder_config.json (the Decoder's arguments), decoder.safetensors and, when
  given, latent_stats.json (per-channel mean / std of the latent)."""
  from safetensors.numpy import save_file

  os.makedirs(out, exist_ok=True)
  files = [os.path.join(out, "decoder_config.json"), os.path.join(out, "decoder.safetensors")]
  with open(files[0], "w") as f:
    json.dump(arguments, f, indent=2)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, files[1],
            metadata={"format": "pt"})
  if latent_stats:
    files.append(os.path.join(out, "latent_stats.json"))
    with open(files[-1], "w") as f:
      json.dump({"mean": list(latent_stats["mean"]), "std": list(latent_stats["std"])}, f)
  return files
