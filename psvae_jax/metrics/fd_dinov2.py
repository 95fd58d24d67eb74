"""Frechet distance on DINOv2 features (FD-DINOv2, Stein et al. 2023): the feature function.

Use with `psvae_jax.metrics.fid.frechet_distance_between(dinov2_feature_fn(model), a, b)`.
The feature is the CLS token of the final (layer-normed) hidden state, computed on images
resized (bicubic, antialiased as PIL) to 224x224 and normalised with the ImageNet mean/std.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.metrics.precision import full_precision
from psvae_jax.models.resize import resize_bicubic

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def dinov2_inputs(images: jax.Array, image_size: int = 224) -> jax.Array:
  """[-1, 1] NHWC images -> DINOv2 pixel_values (NHWC, resized, ImageNet-normalised)."""
  x = (images.astype(jnp.float32) + 1.0) * 0.5
  if x.shape[1:3] != (image_size, image_size):
    x = resize_bicubic(x, (image_size, image_size), antialias=True)
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def dinov2_feature_fn(model: nnx.Module, *, image_size: int = 224
                      ) -> Callable[[jax.Array], jax.Array]:
  """Jitted [-1, 1] images -> (B, D) CLS features of a DINOv2 module from
  `psvae_jax.ports.hf.load` (whose call returns transformers' `last_hidden_state`)."""

  @nnx.jit
  @full_precision
  def features(m, images):
    return m(dinov2_inputs(images, image_size))[:, 0].astype(jnp.float32)

  return lambda images: features(model, images)
