"""Ports of plain PyTorch state dicts (torchvision / pip-package weights) to NNX modules.

Weights are read only from safetensors files (or given as dicts of arrays); pickle files
(`.pth`) are refused. Convert them once with torch, e.g. for LPIPS:

  # VGG16 trunk (torchvision, ImageNet weights):
  python -c "import torchvision, safetensors.torch as st; st.save_file(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), 'vgg16.safetensors')"
  # LPIPS heads shipped in the `lpips` package (lpips/weights/v0.1/vgg.pth):
  python -c "import torch, safetensors.torch as st; st.save_file(torch.load('vgg.pth', map_location='cpu', weights_only=True), 'lpips_vgg.safetensors')"
  # pytorch-fid's Inception (pt_inception-2015-12-05-6726825d.pth):
  python -c "import torch, safetensors.torch as st; st.save_file(torch.load('pt_inception-2015-12-05-6726825d.pth', map_location='cpu', weights_only=True), 'pt_inception-2015-12-05.safetensors')"

Every converter is strict: missing, unexpected or mis-shaped tensors raise one WeightLoadError.
The returned modules hold float32 host (numpy) parameters; `dtype` is the compute dtype.
"""
from __future__ import annotations

from typing import Any, Mapping, Union

import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.ports.common import TensorPool, WeightLoadError, assign, read_safetensors
from psvae_jax.tree_paths import path_str

Dtype = Any
StateDict = Union[str, Mapping[str, Any]]


def _as_arrays(source: StateDict, what: str) -> tuple[dict[str, np.ndarray], str]:
  """A safetensors path or a mapping of arrays (numpy, jax or torch tensors) -> numpy dict."""
  if isinstance(source, str):
    return read_safetensors(source), source
  if not isinstance(source, Mapping):
    raise WeightLoadError(f"{what}: expected a safetensors path or a dict of arrays, got "
                          f"{type(source).__name__}")
  out = {}
  for name, value in source.items():
    if hasattr(value, "detach"):  # torch tensor
      value = value.detach().cpu().numpy()
    out[name] = np.asarray(value)
  return out, f"{what} (dict)"


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch (out, in, kh, kw) -> flax (kh, kw, in, out)."""
  if w.ndim != 4:
    raise WeightLoadError(f"expected a 4-D conv weight, got shape {w.shape}")
  return np.transpose(w, (2, 3, 1, 0))


def _param_names(module: nnx.Module) -> list[str]:
  return [path_str(path) for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))]


def lpips_from_state_dicts(vgg16_features_state_dict: StateDict,
                           lpips_heads_state_dict: StateDict, *,
                           dtype: Dtype = jnp.float32) -> nnx.Module:
  """LPIPS-VGG16 from torchvision VGG16 weights and the `lpips` package's linear heads.

  Args:
    vgg16_features_state_dict: torchvision `vgg16().state_dict()` format (`features.<i>.weight`,
      `features.<i>.bias`; `classifier.*` tensors, if present, are ignored), as a safetensors
      path or a dict of arrays.
    lpips_heads_state_dict: `lpips` `weights/v0.1/vgg.pth` format (`lin<k>.model.1.weight` of
      shape (1, C_k, 1, 1), k = 0..4), as a safetensors path or a dict of arrays.
    dtype: VGG compute dtype.
  Returns:
    `psvae_jax.models.lpips.LPIPS` with the weights loaded.
  """
  from psvae_jax.models.lpips import LPIPS, TAP_CHANNELS, VGG16_CONV_INDICES
  vgg, vgg_source = _as_arrays(vgg16_features_state_dict, "VGG16 state dict")
  heads, heads_source = _as_arrays(lpips_heads_state_dict, "LPIPS heads state dict")
  model = nnx.eval_shape(lambda: LPIPS(dtype=dtype, rngs=nnx.Rngs(0)))
  # The two sources' names do not overlap (`features.*` / `classifier.*` vs `lin*`).
  pool = TensorPool({**vgg, **heads}, source=f"{vgg_source} + {heads_source}")
  pool.ignore(lambda n: n.startswith("classifier."))
  targets = {}
  for i, index in enumerate(VGG16_CONV_INDICES):
    w = pool.take(f"features.{index}.weight")
    targets[f"net.convs.{i}.kernel"] = None if w is None else _conv_kernel(w)
    targets[f"net.convs.{i}.bias"] = pool.take(f"features.{index}.bias")
  for k in range(len(TAP_CHANNELS)):
    w = pool.take(f"lin{k}.model.1.weight")
    targets[f"lin{k}.kernel"] = None if w is None else w.reshape(w.shape[0], -1).T
  assign(model, targets, pool, what="LPIPS-VGG16")
  return model


def inception_from_state_dict(state_dict: StateDict, *, resize_input: bool = True,
                              normalize_input: bool = True,
                              dtype: Dtype = jnp.float32) -> nnx.Module:
  """pytorch-fid's FID Inception-v3 from its `pt_inception-2015-12-05` state dict.

  Args:
    state_dict: the torch state dict (torchvision Inception3 names with pytorch-fid's FID
      blocks: `Conv2d_1a_3x3.conv.weight`, `Mixed_7c.branch_pool.bn.running_var`, ...) as a
      safetensors path or a dict of arrays. The 1008-way `fc.*` classifier and any
      `num_batches_tracked` counters are ignored; `AuxLogits.*` is not expected.
    resize_input, normalize_input, dtype: see `psvae_jax.models.inception.FIDInceptionV3`.
  """
  from psvae_jax.models.inception import FIDInceptionV3
  tensors, source = _as_arrays(state_dict, "Inception state dict")
  model = nnx.eval_shape(lambda: FIDInceptionV3(resize_input=resize_input,
                                                normalize_input=normalize_input, dtype=dtype,
                                                rngs=nnx.Rngs(0)))
  pool = TensorPool(tensors, source=source)
  pool.ignore(lambda n: n.startswith("fc.") or n.endswith(".num_batches_tracked"))
  bn_names = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
  targets = {}
  for name in _param_names(model):
    block, layer, leaf = name.rsplit(".", 2)
    if layer == "conv" and leaf == "kernel":
      w = pool.take(f"{block}.conv.weight")
      targets[name] = None if w is None else _conv_kernel(w)
    elif layer == "bn" and leaf in bn_names:
      targets[name] = pool.take(f"{block}.bn.{bn_names[leaf]}")
    else:
      raise WeightLoadError(f"no Inception mapping for parameter {name}")
  assign(model, targets, pool, what="FID Inception-v3")
  return model
