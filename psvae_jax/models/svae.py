"""The semantic VAE of PS-VAE (stage 1): E_s, the KL bottleneck and D_s.

E_s: transformer blocks of the representation encoder's shape on its feature grid, then an MLP
to 2 x latent_channels (mean, log-variance clamped to [-30, 20]). z is a reparameterised sample.
D_s: an MLP back to the encoder width, then transformer blocks; its output f'' is compared with
the encoder features f'. Shapes: (B, h, w, width) -> z (B, h, w, C) -> (B, h, w, width).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from psvae_jax.models.vit import TransformerStack
from psvae_jax.models import dense
from psvae_jax.sharding import constrain

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _dense(d_in, d_out, names, *, dtype, param_dtype, rngs, zero=False):
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
  return dense.Linear(d_in, d_out, kernel_init=nnx.with_partitioning(init, names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class ProjectionMLP(nnx.Module):
  """Linear -> GELU -> Linear, the projection between the encoder width and the latent."""

  def __init__(self, d_in: int, d_hidden: int, d_out: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = _dense(d_in, d_hidden, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)
    self.fc2 = _dense(d_hidden, d_out, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class DiagonalGaussian:
  """Posterior N(mean, exp(logvar)) with LDM's KL convention."""

  def __init__(self, mean: jax.Array, logvar: jax.Array):
    self.mean = mean
    self.logvar = jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def sample(self, rng: jax.Array) -> jax.Array:
    eps = jax.random.normal(rng, self.mean.shape, jnp.float32)
    return self.mean + jnp.exp(0.5 * self.logvar) * eps

  def kl(self) -> jax.Array:
    """KL to N(0, I) summed over all latent dims, per example: (B,)."""
    terms = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
    return jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1)


class SemanticVAE(nnx.Module):
  """E_s + KL bottleneck + D_s on a (B, h, w, width) feature grid."""

  def __init__(self, width: int = 768, num_heads: int = 12, mlp_dim: int = 3072,
               depth: int = 3, latent_channels: int = 96, *, layer_scale_init: float | None = None,
               norm_eps: float = 1e-6, scan_layers: bool = False, remat: bool = False,
               attention_impl: str = "xla", dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.width = width
    self.latent_channels = latent_channels
    blocks = dict(layer_scale_init=layer_scale_init, norm_eps=norm_eps, scan_layers=scan_layers,
                  remat=remat, attention_impl=attention_impl, dtype=dtype,
                  param_dtype=param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.enc_blocks = TransformerStack(depth, width, num_heads, mlp_dim, rngs=rngs, **blocks)
    self.enc_proj = ProjectionMLP(width, width, 2 * latent_channels, **kw)
    self.dec_proj = ProjectionMLP(latent_channels, width, width, **kw)
    self.dec_blocks = TransformerStack(depth, width, num_heads, mlp_dim, rngs=rngs, **blocks)

  def encode(self, features: jax.Array) -> DiagonalGaussian:
    b, h, w, d = features.shape
    x = self.enc_blocks(features.reshape(b, h * w, d))
    moments = self.enc_proj(x).astype(jnp.float32).reshape(b, h, w, 2 * self.latent_channels)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return DiagonalGaussian(constrain(mean, ("batch", None, None, None)), logvar)

  def decode(self, z: jax.Array) -> jax.Array:
    b, h, w, c = z.shape
    x = self.dec_blocks(self.dec_proj(z.reshape(b, h * w, c)))
    return x.astype(jnp.float32).reshape(b, h, w, self.width)

  def __call__(self, features: jax.Array, rng: jax.Array | None = None):
    """Returns (reconstructed features, z, posterior); z is the mean when rng is None."""
    posterior = self.encode(features)
    z = posterior.mean if rng is None else posterior.sample(rng)
    return self.decode(z), z, posterior


def semantic_loss(pred: jax.Array, target: jax.Array) -> tuple[jax.Array, dict]:
  """L_s = MSE(f'', f') + (1 - cos(f'', f')) per token, averaged over tokens and batch."""
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  mse = jnp.mean(jnp.square(pred - target))
  eps = 1e-8
  cos = jnp.sum(pred * target, -1) / (
      jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1) + eps)
  cos = jnp.mean(cos)
  return mse + (1.0 - cos), {"semantic_mse": mse, "semantic_cos": cos}
