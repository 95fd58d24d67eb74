"""Stage 1, S-VAE: a semantic VAE on a frozen representation encoder's features.

Loss = L_s(D_s(z), f') + kl_weight * KL, with f' = RAE features of the frozen encoder
(last hidden state, prefix tokens dropped, LayerNorm without affine) and z ~ q(z | E_s(f')).
Eval: semantic reconstruction cosine / MSE of the posterior mean on held-out images.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from psvae_jax.config_base import ConfigError
from psvae_jax.models.svae import SemanticVAE, semantic_loss
from psvae_jax.tasks import common
from psvae_jax.tasks.base import Task


class SVAEModel(nnx.Module):
  """Frozen representation encoder + the semantic VAE trained on its features."""

  def __init__(self, model_config, *, dtype, attention_impl: str, rngs: nnx.Rngs):
    self.encoder = common.build_representation_encoder(model_config, dtype=dtype,
                                                       attention_impl=attention_impl, rngs=rngs)
    self.svae = common.build_semantic_vae(model_config, self.encoder, dtype=dtype,
                                          attention_impl=attention_impl, rngs=rngs)


class SVAETask(Task):
  """S-VAE (PAPER.md stage 1)."""

  frozen_params = r"^encoder\."

  def build_model(self, rngs: nnx.Rngs) -> SVAEModel:
    return SVAEModel(self.config.model, dtype=common.compute_dtype(self.config),
                     attention_impl=self.config.attention_impl, rngs=rngs)

  def check_fresh_start(self) -> None:
    if self.config.model.require_pretrained_encoder:
      raise ConfigError(
          "config.init is empty: the S-VAE needs the pretrained representation encoder. Convert "
          "it once (python -m psvae_jax.tools.convert --src=HF_DIR --out=DIR) and pass "
          "--config.init=DIR, or set config.model.require_pretrained_encoder=False to train on "
          "a randomly initialised encoder")

  def load_init(self, params: nnx.State, path: str) -> nnx.State:
    params = common.load_encoder_init(params, path, prefix="encoder")
    if self.config.model.init_from_encoder:
      params = common.copy_encoder_blocks_into_svae(params, self.config.model.svae_depth)
    return params

  def loss(self, model: SVAEModel, batch, rng, step):
    features = common.encoder_features(model.encoder, batch["image"], self.config.model)
    features = jax.lax.stop_gradient(features)
    recon, _, posterior = model.svae(features, rng)
    l_s, metrics = semantic_loss(recon, features)
    kl = jnp.mean(posterior.kl())
    loss = self.config.loss.semantic_weight * l_s + self.config.loss.kl_weight * kl
    return loss, {**metrics, "semantic_loss": l_s, "kl": kl}

  def evaluate(self, model: SVAEModel, batch, rng):
    features = common.encoder_features(model.encoder, batch["image"], self.config.model)
    recon, z, posterior = model.svae(features)
    _, metrics = semantic_loss(recon, features)
    return {**metrics, "kl": jnp.mean(posterior.kl()), "latent_std": jnp.std(z)}

  def flops_per_example(self) -> float:
    return common.svae_train_flops(self.config.model)

