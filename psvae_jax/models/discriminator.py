"""LDM's PatchGAN discriminator (`NLayerDiscriminator`, from pix2pix via taming-transformers). NHWC.

  conv 4x4/2 (3 -> ndf, bias) - LeakyReLU(0.2)
  n = 1 .. n_layers-1: conv 4x4/2 (no bias) - norm - LeakyReLU(0.2), widths ndf * min(2**n, 8)
  conv 4x4/1 (no bias) - norm - LeakyReLU(0.2), width ndf * min(2**n_layers, 8)
  conv 4x4/1 (-> 1 logit per patch, bias)
every conv with padding 1. For 256x256 inputs and n_layers=3 the output is (B, 30, 30, 1).

Normalisation (`norm='batch'`, LDM's default): BatchNorm (momentum 0.1 in torch terms = 0.9
here, eps 1e-5) using the statistics of the batch it is given while training
(`use_running_average=False`, which also updates the running averages stored as nnx.BatchStat)
and the running averages in eval mode (`model.eval()` / `use_running_average=True`). As in LDM,
call the discriminator separately on real and on reconstructed images: each call normalises with
its own batch statistics. Under `jit` with a batch sharded across devices the statistics are
those of the global batch (synchronised BatchNorm), unlike LDM's per-GPU statistics.
`norm='actnorm'` is not provided: LDM's configs use BatchNorm.

Initialisation follows LDM's `weights_init`: conv kernels N(0, 0.02), BatchNorm scale N(1, 0.02)
and bias 0; conv biases start at 0 (torch leaves them at its default uniform init).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from psvae_jax.sharding import IMAGE_AXES, constrain

Dtype = Any


def _init(names, init):
  return nnx.with_partitioning(init, names)


def _normal_around_one(stddev: float):
  def init(key, shape, dtype=jnp.float32):
    return 1.0 + stddev * jax.random.normal(key, shape, dtype)
  return init


class NLayerDiscriminator(nnx.Module):
  """PatchGAN: images (B, H, W, in_ch) in [-1, 1] -> patch logits (B, h, w, 1), float32."""

  def __init__(self, in_ch: int = 3, ndf: int = 64, n_layers: int = 3, *,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if n_layers < 1:
      raise ValueError(f"n_layers must be >= 1, got {n_layers}")

    def conv(cin, cout, stride, use_bias):
      return nnx.Conv(cin, cout, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=_init((None, None, None, "conv_out"),
                                        nnx.initializers.normal(0.02)),
                      bias_init=_init((None,), nnx.initializers.zeros), rngs=rngs)

    def norm(c):
      return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, use_running_average=False,
                           dtype=dtype, param_dtype=param_dtype,
                           scale_init=_init(("norm",), _normal_around_one(0.02)),
                           bias_init=_init(("norm",), nnx.initializers.zeros), rngs=rngs)

    widths = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]
    self.conv_in = conv(in_ch, widths[0], 2, True)
    convs, norms = [], []
    for n in range(1, n_layers + 1):
      convs.append(conv(widths[n - 1], widths[n], 2 if n < n_layers else 1, False))
      norms.append(norm(widths[n]))
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.conv_out = conv(widths[-1], 1, 1, True)

  def __call__(self, images: jax.Array, *, use_running_average: bool | None = None) -> jax.Array:
    """Patch logits. `use_running_average` overrides the train/eval mode for this call."""
    x = nnx.leaky_relu(self.conv_in(constrain(images, IMAGE_AXES)), 0.2)
    for conv, norm in zip(self.convs, self.norms):
      x = nnx.leaky_relu(norm(conv(constrain(x, IMAGE_AXES)),
                                use_running_average=use_running_average), 0.2)
    return self.conv_out(x).astype(jnp.float32)
