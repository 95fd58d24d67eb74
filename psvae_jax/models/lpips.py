"""LPIPS (Zhang et al. 2018), VGG16 variant, as used by LDM's perceptual loss. NHWC.

d(x, y) = sum over the 5 VGG16 taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) of the
spatial mean of w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2, where f_l are the tap activations of
the ImageNet-normalised ("ScalingLayer") inputs, |.| is the per-position L2 norm over channels
(+1e-10) and w_l >= 0 are the learned 1x1 linear heads (no bias).

Inputs are images in [-1, 1], NHWC; the output is (B,). The VGG16 layer list is torchvision's
`vgg16().features[:30]` (the final max-pool is not needed); conv `convs.<i>` is torchvision's
`features.<VGG16_CONV_INDICES[i]>`. Weights come from `psvae_jax.ports.torch_hub`.
The module is a frozen metric/loss network: callers keep its parameters out of the optimiser.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.sharding import IMAGE_AXES, constrain

Dtype = Any

# torchvision vgg16().features: conv widths per block; taps after each block's last ReLU.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
TAP_CHANNELS = tuple(block[-1] for block in VGG16_BLOCKS)
# LPIPS' ScalingLayer: (x - shift) / scale maps [-1, 1] images to ImageNet statistics.
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def _init(names, init=None):
  return nnx.with_partitioning(init or nnx.initializers.lecun_normal(), names)


class VGG16Features(nnx.Module):
  """The 13 3x3 convs of VGG16 with ReLU and 2x2 max-pools; returns the 5 LPIPS taps."""

  def __init__(self, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    convs, in_ch = [], 3
    for block in VGG16_BLOCKS:
      for out_ch in block:
        convs.append(nnx.Conv(in_ch, out_ch, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype,
                              param_dtype=param_dtype,
                              kernel_init=_init((None, None, None, "conv_out")),
                              bias_init=_init((None,), nnx.initializers.zeros), rngs=rngs))
        in_ch = out_ch
    self.convs = nnx.List(convs)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps, i = [], 0
    for b, block in enumerate(VGG16_BLOCKS):
      if b > 0:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
      for _ in block:
        x = constrain(nnx.relu(self.convs[i](x)), IMAGE_AXES)
        i += 1
      taps.append(x)
    return taps


def _unit_normalise(x: jax.Array, eps: float = 1e-10) -> jax.Array:
  """x / (||x||_channels + eps), with a finite gradient where a feature vector is all zero."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return x / (norm + eps)


class LPIPS(nnx.Module):
  """LPIPS-VGG16 distance: `LPIPS(...)(x, y)` -> (B,) for NHWC images in [-1, 1].

  `dtype` is the VGG compute dtype (bf16 option); normalisation, heads and the average are
  float32. Heads are `lin<k>.kernel` of shape (C_k, 1).
  """

  def __init__(self, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.net = VGG16Features(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    for k, channels in enumerate(TAP_CHANNELS):
      setattr(self, f"lin{k}", nnx.Linear(
          channels, 1, use_bias=False, param_dtype=param_dtype,
          kernel_init=_init((None, None), nnx.initializers.uniform(1.0 / channels)), rngs=rngs))

  def heads(self) -> list[nnx.Linear]:
    return [getattr(self, f"lin{k}") for k in range(len(TAP_CHANNELS))]

  def _scaled(self, images: jax.Array) -> jax.Array:
    return ((images.astype(jnp.float32) - SHIFT) / SCALE).astype(self.dtype)

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"LPIPS expects two NHWC RGB batches of the same shape, got {x.shape} "
                       f"and {y.shape}")
    # A VGG pass per batch, not one over their concatenation: split over devices, the joined
    # batch would put all of x on some devices and all of y on others, and comparing their
    # features would then move every activation across the mesh (10 GB a step a chip in the
    # PS-VAE step on 8 v5p chips); interleaving them instead costs copies of every feature map.
    taps_x, taps_y = (self.net(constrain(self._scaled(images), IMAGE_AXES)) for images in (x, y))
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for tap_x, tap_y, head in zip(taps_x, taps_y, self.heads()):
      diff = (_unit_normalise(tap_x.astype(jnp.float32)) -
              _unit_normalise(tap_y.astype(jnp.float32))) ** 2
      total = total + jnp.mean(head(diff)[..., 0], axis=(1, 2))
    return total
