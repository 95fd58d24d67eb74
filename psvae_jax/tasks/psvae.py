"""Stage 2, PS-VAE: everything unfrozen, pixel reconstruction added, semantics kept.

Initialised from a converged S-VAE run (`config.init` = its workdir): the encoder, E_s, D_s,
the pixel decoder (and LPIPS, logvar, discriminator when present) come from the S-VAE's EMA
weights where it kept them; a frozen copy of the S-VAE's (= the original pretrained) encoder
becomes the `teacher` whose features are the semantic target.
Loss = 1.0 L_s + pixel_weight L_P + kl_weight L_KL, with L_P = LDM's L1 + LPIPS + PatchGAN.
After the last step the per-channel latent mean/std over training batches are saved with the
checkpoint for the generator stages.
"""
from __future__ import annotations

import jax
from flax import nnx

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import sharding
from psvae_jax import train_state as ts
from psvae_jax.config_base import ConfigError
from psvae_jax.tasks import autoencoder_parts
from psvae_jax.tasks.autoencoder import AutoencoderTask

# PS-VAE parameter group <- S-VAE parameter group.
_FROM_SVAE = {"encoder": "encoder", "teacher": "encoder", "svae": "svae",
              "pixel_decoder": "pixel_decoder", "lpips": "lpips", "logvar": "logvar",
              "discriminator": "discriminator"}


class PSVAETask(AutoencoderTask):
  """PS-VAE (docs/method.md#stage-2-ps-vae)."""

  stage = "psvae"
  frozen_params = r"^(teacher|lpips)\."

  def check_fresh_start(self) -> None:
    if self.config.model.require_pretrained_encoder:
      raise ConfigError("config.init is empty: PS-VAE starts from a trained S-VAE; pass "
                        "--config.init=<the S-VAE run's workdir>")

  def load_init(self, params: nnx.State, path: str) -> nnx.State:
    if not path:
      return self.load_lpips(params)
    source = load_svae_params(path, self.config)
    for group, src_group in _FROM_SVAE.items():
      if group not in params:
        continue
      if src_group not in source:
        if group in ("discriminator", "lpips"):
          continue  # a fresh discriminator / LPIPS loaded below is fine
        raise ckpt_lib.CheckpointError(f"config.init={path!r}: the S-VAE checkpoint has no "
                                       f"'{src_group}' parameters to initialise '{group}'")
      params = autoencoder_parts.fill_subtree(params, group, source[src_group], what=path)
    if "lpips" not in source:
      params = self.load_lpips(params)
    return params


def load_svae_params(path: str, config) -> nnx.State:
  """All parameters of an S-VAE run (EMA weights for its trainable parts when it kept EMA).

  The S-VAE's own config.json decides the model shape; it must match this run's `model`
  section in everything both stages share.
  """
  from psvae_jax.tasks.svae import SVAETask
  import ml_collections

  directory = ckpt_lib.resolve_checkpoint_dir(path)
  svae_config = ml_collections.ConfigDict(ckpt_lib.read_config(directory))
  for key in ("encoder", "latent_channels", "svae_depth", "encoder_resolution"):
    if svae_config.model[key] != config.model[key]:
      raise ConfigError(f"config.model.{key}={config.model[key]!r} differs from the S-VAE run "
                        f"at {path} ({svae_config.model[key]!r})")
  task = SVAETask(svae_config)
  mesh = sharding.make_mesh(config.mesh)
  layout = ts.make_train_setup(task, svae_config, mesh)
  reader = ckpt_lib.Checkpointer(directory, create=False, async_save=False)
  step = reader.latest_step()
  if step is None:
    raise ckpt_lib.CheckpointError(f"config.init={path!r}: no complete checkpoint in {directory}")
  restored = reader.restore(step, abstract_state=layout.abstract_state,
                            abstract_ema=layout.abstract_ema, with_extras=False)
  reader.close()
  state = restored["state"]
  trainable = restored.get("ema") if restored.get("ema") is not None else state["params"]
  merged = nnx.merge_state(trainable, state["frozen"])
  return {name: merged[name] for name in merged.keys()}
