"""Stage 1, S-VAE: a semantic VAE on a frozen representation encoder's features.

Loss = L_s(D_s(z), f') + kl_weight * KL, with f' the RAE features of the frozen encoder and
z ~ q(z | E_s(f')); plus the evaluation pixel decoder's L1 (+ LPIPS) on stop_gradient(z).
Eval: semantic cosine / MSE of the posterior mean and PSNR / SSIM of the pixel decoder.
"""
from __future__ import annotations

from flax import nnx

from psvae_jax.config_base import ConfigError
from psvae_jax.tasks import autoencoder_parts
from psvae_jax.tasks.autoencoder import AutoencoderTask


class SVAETask(AutoencoderTask):
  """S-VAE (docs/method.md#stage-1-s-vae)."""

  stage = "svae"
  frozen_params = r"^(encoder|lpips)\."

  def check_fresh_start(self) -> None:
    if self.config.model.require_pretrained_encoder:
      raise ConfigError(
          "config.init is empty: the S-VAE needs the pretrained representation encoder. Convert "
          "it once (python -m psvae_jax.tools.convert --src=HF_DIR --out=DIR) and pass "
          "--config.init=DIR, or set config.model.require_pretrained_encoder=False to train on "
          "a randomly initialised encoder")

  def load_init(self, params: nnx.State, path: str) -> nnx.State:
    if path:
      params = autoencoder_parts.load_encoder_init(params, path, prefix="encoder")
      if self.config.model.init_from_encoder:
        params = autoencoder_parts.copy_encoder_blocks_into_svae(params, self.config.model.svae_depth)
    return self.load_lpips(params)
