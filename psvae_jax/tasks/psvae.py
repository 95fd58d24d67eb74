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

from flax import nnx

from psvae_jax.config_base import ConfigError
from psvae_jax.tasks.autoencoder import AutoencoderTask
from psvae_jax.tasks.base import ParentRun


class PSVAETask(AutoencoderTask):
  """PS-VAE (docs/method.md#stage-2-ps-vae)."""

  stage = "psvae"
  frozen_params = r"^(teacher|lpips)\."
  # PS-VAE parameter group <- S-VAE parameter group; a fresh discriminator / LPIPS is fine.
  parent = ParentRun(
      task="svae",
      groups={"encoder": "encoder", "teacher": "encoder", "svae": "svae",
              "pixel_decoder": "pixel_decoder", "lpips": "lpips", "logvar": "logvar",
              "discriminator": "discriminator"},
      optional=("discriminator", "lpips"),
      match=("encoder", "latent_channels", "svae_depth", "encoder_resolution"))

  def check_fresh_start(self) -> None:
    if self.config.model.require_pretrained_encoder:
      raise ConfigError("config.init is empty: PS-VAE starts from a trained S-VAE; pass "
                        "--config.init=<the S-VAE run's workdir>")

  def load_init(self, params: nnx.State, path: str) -> nnx.State:
    if not path:
      return self.load_lpips(params)
    return params

  def from_parent(self, params: nnx.State, parent_groups: set[str], extras: dict,
                  what: str) -> nnx.State:
    if "lpips" in params and "lpips" not in parent_groups:
      params = self.load_lpips(params)
    return params
