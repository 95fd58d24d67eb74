"""psvae_jax: PS-VAE (semantic + pixel VAE on representation encoders) and its generators in JAX.

Importing the package sets two process-wide options every module relies on:
- parameters carry *logical* axis names (see `psvae_jax.sharding`); Flax must not try to
  shard them eagerly at creation, the training loop places them from abstract shapes;
- `jax_threefry_partitionable` so random numbers do not depend on how arrays are sharded.
"""
import flax
import jax

flax.config.update("flax_always_shard_variable", False)
jax.config.update("jax_threefry_partitionable", True)

__version__ = "0.1.0"
