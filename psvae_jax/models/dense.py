"""Dense layers whose matmul always sees 2-D operands.

Inputs (..., d_in) are flattened to (N, d_in) before the product and reshaped back after. The
weight gradient of a matmul over (batch, seq, d) inputs contracts two dimensions; XLA:CPU runs
that form through a slow path (it made the MMDiT training step 1.8x slower on a 2-core CPU).
Flattened, forward and both gradients are plain GEMMs on every backend; the parameters are
exactly those of `nnx.Linear`, so checkpoints and weight ports are unchanged.
"""
import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Linear):
  """`nnx.Linear` over the last axis, computed as one 2-D matmul."""

  def __call__(self, inputs: jax.Array, **kwargs) -> jax.Array:
    lead = inputs.shape[:-1]
    y = super().__call__(inputs.reshape(-1, inputs.shape[-1]), **kwargs)
    return y.reshape(*lead, y.shape[-1])


def project(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (..., d) times kernel (d, *out) -> (..., *out), as one 2-D matmul (fused projections
  such as q/k/v kept as a (d, 3, e) kernel)."""
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[0], -1))
  return y.reshape(*x.shape[:-1], *kernel.shape[1:])
