"""Pieces shared by the autoencoder stages (S-VAE, PS-VAE): encoder, semantic VAE, features,
pretrained-encoder loading and FLOP counts."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax.config_base import ConfigError
from psvae_jax.models import encoders, scan_layout
from psvae_jax.models import flops as flops_lib
from psvae_jax.models.svae import SemanticVAE
from psvae_jax.tree_paths import path_keys


def compute_dtype(config):
  return jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32


def encoder_config(model_config) -> encoders.EncoderConfig:
  if model_config.encoder not in encoders.PRESETS:
    raise ConfigError(f"config.model.encoder={model_config.encoder!r} is not a known encoder "
                      f"preset; known: {sorted(encoders.PRESETS)}")
  return encoders.PRESETS[model_config.encoder]


def build_representation_encoder(model_config, *, dtype, attention_impl, rngs):
  """The representation encoder named by `model_config.encoder` (random init)."""
  return encoders.build_encoder(encoder_config(model_config), rngs=rngs, dtype=dtype,
                                attention_impl=attention_impl,
                                scan_layers=model_config.scan_layers, remat=model_config.remat)


def build_semantic_vae(model_config, encoder, *, dtype, attention_impl, rngs) -> SemanticVAE:
  """E_s / D_s with blocks of the encoder's shape (so they can be copied from it)."""
  c = encoder.config
  return SemanticVAE(c.width, c.num_heads, c.mlp_dim, model_config.svae_depth,
                     model_config.latent_channels, layer_scale_init=c.layer_scale_init,
                     norm_eps=c.norm_eps, scan_layers=model_config.scan_layers,
                     remat=model_config.remat, attention_impl=attention_impl, dtype=dtype,
                     rngs=rngs)


def encoder_features(encoder, images, model_config) -> jax.Array:
  """RAE features (B, h, w, width) of uint8 NHWC images, in float32."""
  pixels = encoders.preprocess_pixels(images, size=model_config.encoder_resolution,
                                      mean=encoder.image_mean, std=encoder.image_std)
  return encoders.rae_features(encoder, pixels.astype(encoder.dtype))


def _abstract_pure(state: nnx.State):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state.to_pure_dict())


def load_encoder_init(params: nnx.State, path: str, *, prefix: str) -> nnx.State:
  """Fills params[prefix] from a converted-weights directory (`psvae_jax.tools.convert`)."""
  port_config = os.path.join(path, "port_config.json")
  if not os.path.isfile(port_config):
    raise ckpt_lib.CheckpointError(
        f"config.init={path!r}: not a converted-weights directory (no port_config.json). Convert "
        "a transformers checkpoint once with `python -m psvae_jax.tools.convert --src=... "
        "--out=DIR` and pass DIR.")
  with open(port_config) as f:
    meta = json.load(f)
  target = params[prefix]
  what = f"{prefix} ({meta.get('model_type', '?')})"
  stored = os.path.join(path, "params")
  if _is_scanned(target):
    # Converted weights hold the unscanned layout: restore them as stored, then stack.
    params = fill_subtree(params, prefix, ckpt_lib.restore_tree(stored, None, what=what),
                          what=path)
  else:
    restored = ckpt_lib.restore_tree(stored, _abstract_pure(target), what=what)
    nnx.replace_by_pure_dict(target, restored)
  return params


def _is_scanned(state: nnx.State) -> bool:
  """Whether any parameter carries the 'layers' axis of a scanned stack."""
  return any("layers" in (getattr(v, "out_sharding", None) or ())
             for _, v in nnx.to_flat_state(state))


def copy_encoder_blocks_into_svae(params: nnx.State, depth: int) -> nnx.State:
  """Initialises E_s and D_s blocks from the encoder's last `depth` blocks (unscanned only)."""
  enc_blocks = params["encoder"]["blocks"]["blocks"]
  if not isinstance(enc_blocks, nnx.State) or 0 not in enc_blocks:
    raise ConfigError("config.model.init_from_encoder needs config.model.scan_layers=False")
  n = len(enc_blocks)
  for name in ("enc_blocks", "dec_blocks"):
    for j in range(depth):
      src = enc_blocks[n - depth + j]
      dst = params["svae"][name]["blocks"][j]
      nnx.replace_by_pure_dict(dst, jax.tree.map(jnp.copy, src.to_pure_dict()))
  return params


def _encoder_flops_parts(model_config, image_size: int) -> tuple[float, float, float]:
  """(bicubic resize, patch embedding, transformer) forward FLOPs on one image."""
  c = encoder_config(model_config)
  res = model_config.encoder_resolution
  tokens = (res // c.patch_size) ** 2
  resize = flops_lib.resize_flops((image_size, image_size), (res, res), c.num_channels)
  patches = float(2 * tokens * c.patch_size**2 * c.num_channels * c.width)
  blocks = flops_lib.vit_forward_flops(c.width, c.depth, c.mlp_dim, tokens + c.num_prefix_tokens,
                             gated=c.mlp_type == "swiglu")
  return resize, patches, blocks


def _svae_halves_flops(model_config) -> tuple[float, float]:
  """(E_s, D_s) forward FLOPs, blocks and projection MLPs, on one example's feature grid."""
  c = encoder_config(model_config)
  tokens = (model_config.encoder_resolution // c.patch_size) ** 2
  blocks = flops_lib.vit_forward_flops(c.width, model_config.svae_depth, c.mlp_dim, tokens,
                                   gated=c.mlp_type == "swiglu")
  c_lat = model_config.latent_channels
  e_s = blocks + 2 * tokens * (c.width * c.width + c.width * 2 * c_lat)
  d_s = blocks + 2 * tokens * (c_lat * c.width + c.width * c.width)
  return e_s, d_s


def svae_forward_flops(model_config) -> float:
  """E_s and D_s (blocks and projection MLPs) on one example's feature grid."""
  return sum(_svae_halves_flops(model_config))


def latent_encoder_forward_flops(model_config) -> float:
  """The latents of one image already at `encoder_resolution` (as the generator stages feed
  it): patch embedding, the encoder's transformer and E_s."""
  _, patches, blocks = _encoder_flops_parts(model_config, model_config.encoder_resolution)
  return patches + blocks + _svae_halves_flops(model_config)[0]


def autoencoder_train_flops(config, stage: str) -> float:
  """FLOPs of one S-VAE ('svae') or PS-VAE ('psvae') training step, per example.

  Backward = 2x forward for trained networks; for networks whose weights are not trained but
  whose input gradient is needed (LPIPS, the generator's view of the discriminator) it is 1x
  forward, of the one input that needs it. Terms, as `autoencoder.autoencoder_loss` runs them:
    encoder: forward (S-VAE, frozen) or forward + backward, plus the teacher's forward (PS-VAE)
    semantic VAE and pixel decoder: forward + backward
    LPIPS on (x, x_rec): forward on both + gradient to x_rec
    with the discriminator: the adaptive weight's two last-layer gradients (conv_out's, from
    LPIPS's and the discriminator's input gradients again; their forwards are not repeated),
    the generator term through the discriminator, and the discriminator's own forward +
    backward on real and reconstructed images.
  """
  if stage not in ("svae", "psvae"):
    raise ValueError(f"stage must be 'svae' or 'psvae', got {stage!r}")
  m, lc = config.model, config.loss
  c = encoder_config(m)
  grid = m.encoder_resolution // c.patch_size
  resize, patches, blocks = _encoder_flops_parts(m, config.data.image_size)
  flops = resize + patches + blocks
  if stage == "psvae":
    # The teacher's forward; the encoder's backward (no gradient for the pixels themselves).
    flops += resize + patches + blocks + patches + 2 * blocks
  flops += 3 * svae_forward_flops(m)
  body, out = flops_lib.pixel_decoder_config_flops(m.pixel_decoder, (grid, grid),
                                                    z_channels=m.latent_channels)
  flops += 3 * (body + out)
  size = grid * 2 ** (len(m.pixel_decoder.ch_mult) - 1)
  lpips = flops_lib.lpips_forward_flops(size, size) if lc.perceptual_weight > 0 else 0
  lpips_grad = lpips / 2  # lpips counts the image pair; the gradient goes to x_rec alone
  flops += lpips + lpips_grad
  d = m.discriminator
  if d.enabled:
    disc = flops_lib.patchgan_forward_flops(size, size, ndf=d.ndf, n_layers=d.n_layers)
    flops += 2 * (2 * out) + lpips_grad + disc  # adaptive weight
    flops += 2 * disc  # generator term
    flops += 2 * 3 * disc  # discriminator on real and reconstructed images
  return float(flops)


def fill_subtree(params: nnx.State, prefix: str, source: nnx.State, *, what: str) -> nnx.State:
  """params[prefix] <- `source` (same structure), placed on params[prefix]'s shardings.

  Structure or shape differences are an error listing them.
  """
  target = params[prefix]
  try:
    # The source may hold the other layer layout (scanned vs unscanned): match the target's.
    source = scan_layout.match_scan_layout(source, _abstract_pure(target))
  except scan_layout.ScanLayoutError as e:
    raise ckpt_lib.CheckpointError(f"cannot load {prefix} from {what}: {e}") from e
  want = {path_keys(path): leaf for path, leaf in nnx.to_flat_state(target)}
  have = {path_keys(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(source)[0]}
  problems = [f"missing {'.'.join(map(str, p))}" for p in want if p not in have]
  problems += [f"unexpected {'.'.join(map(str, p))}" for p in have if p not in want]
  problems += [f"{'.'.join(map(str, p))}: {have[p].shape} vs model "
               f"{want[p].get_value().shape}" for p in want
               if p in have and have[p].shape != want[p].get_value().shape]
  if problems:
    raise ckpt_lib.CheckpointError(f"cannot load {prefix} from {what}: " + "; ".join(problems[:20]))
  for path, variable in want.items():
    value = variable.get_value()
    # A copy: one source may fill two groups (encoder and teacher), and the train step
    # donates its state, which must not hold the same buffer twice.
    variable.set_value(jax.device_put(jnp.array(have[path], value.dtype, copy=True),
                                      value.sharding))
  return params
