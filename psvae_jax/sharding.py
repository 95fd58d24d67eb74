"""Mesh construction and the logical-axis rules that place parameters and activations.

Three layers, as in maxtext: (1) a device mesh with axes ('data', 'fsdp', 'tensor');
(2) a rules table mapping *logical* axis names to mesh axes; (3) annotations: parameters are
created with `nnx.with_partitioning(init, ('embed', 'mlp'))` and activations are constrained
with `constrain(x, ('batch', 'seq', 'act_embed'))`.

Logical names used by the models:
  batch      global batch dimension of activations        -> ('data', 'fsdp')
  embed      model width of a parameter (FSDP-sharded)     -> 'fsdp'
  mlp        MLP hidden dim of a parameter                 -> 'tensor'
  heads      flattened heads*head_dim of q/k/v/o kernels   -> 'tensor'
  kv_heads   flattened kv heads*head_dim (GQA)             -> 'tensor'
  vocab      vocabulary                                    -> 'tensor'
  conv_out   output channels of a conv kernel              -> 'fsdp'
  image_batch  batch of a conv network's NHWC activation   -> ('data', 'fsdp', 'tensor')
  image_rows   its rows (H), when tensor is left over      -> 'tensor'
  anything else (seq, act_embed, layers, norm, conv_in, None) -> replicated

A dimension takes the longest leading run of its mesh axes whose product divides its size;
with none it is replicated, so small models run on any mesh.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from psvae_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "conv_out": "fsdp",
    # Convolutional networks (pixel decoder, LPIPS, PatchGAN) have no tensor parallelism: their
    # activations take every mesh axis over the batch, or, where the batch does not divide,
    # the tensor axis over image rows (XLA exchanges the conv halos), never replicated copies.
    "image_batch": ("data", "fsdp", "tensor"),
    "image_rows": "tensor",
}

# Logical axes of an NHWC activation of a convolutional network.
IMAGE_AXES = ("image_batch", "image_rows", None, None)


class MeshError(UserError, ValueError):
  """The configured mesh cannot be built on the available devices."""


DCN_KEY = "dcn_data"  # how many slices the 'data' axis spans (multi-slice jobs)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves axis sizes (-1 = fill with the remaining devices) and checks the product."""
  unknown = set(mesh_config) - set(MESH_AXES) - {DCN_KEY}
  if unknown:
    raise MeshError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES} and {DCN_KEY!r}")
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1:
    raise MeshError(f"at most one mesh axis may be -1, got mesh={dict(mesh_config)}")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh axis sizes must be positive or -1, got mesh={dict(mesh_config)}")
  fixed = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % fixed:
      raise MeshError(
          f"mesh={dict(mesh_config)}: {num_devices} devices are not divisible by the fixed "
          f"axes' product {fixed}")
    sizes[fills[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise MeshError(
        f"mesh={dict(mesh_config)} needs {math.prod(sizes)} devices but {num_devices} are "
        f"available (jax.device_count()); set one axis to -1 to fill")
  dcn = int(mesh_config.get(DCN_KEY, 1))
  if dcn < 1 or sizes[0] % dcn:
    raise MeshError(f"mesh.{DCN_KEY}={dcn} must be a positive divisor of the data axis "
                    f"({sizes[0]}): the data axis spans the slices")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh with Auto axis types (GSPMD propagation).

  On TPU the device order follows the physical torus (`mesh_utils`); with `mesh.dcn_data` > 1
  the data axis spans that many slices (a hybrid mesh: data-centre network between slices,
  ICI within each).
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  dcn = int(mesh_config.get(DCN_KEY, 1))
  if dcn > 1:
    grid = _hybrid_grid(shape, dcn, devices)
  elif devices[0].platform == "tpu":
    grid = _torus_grid(shape, devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _torus_grid(shape: tuple[int, ...], devices: list) -> np.ndarray:
  """TPU devices arranged for `shape`; physical axes are split where the shape needs it."""
  try:
    return mesh_utils.create_device_mesh(shape, devices)
  except (NotImplementedError, ValueError, AssertionError):
    pass  # some logical axis does not match whole physical axes: try splitting them
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (NotImplementedError, ValueError, AssertionError) as e:  # mesh_utils' refusals
    raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))} cannot be laid out on these "
                    f"{len(devices)} TPU devices ({e}); workable (data, fsdp, tensor) shapes: "
                    f"{workable_shapes(devices) or 'none (use a whole slice)'}") from e
  logging.info("mesh %s does not map onto whole physical axes of the TPU torus: split physical "
               "axes (collectives of a split axis use part of a torus ring)",
               dict(zip(MESH_AXES, shape)))
  return grid


def workable_shapes(devices: list, limit: int = 12) -> list[tuple[int, int, int]]:
  """(data, fsdp, tensor) shapes `mesh_utils` can lay out on `devices` (first `limit`)."""
  n, found = len(devices), []
  for tensor in (t for t in range(1, n + 1) if n % t == 0):
    for fsdp in (f for f in range(1, n // tensor + 1) if (n // tensor) % f == 0):
      shape = (n // tensor // fsdp, fsdp, tensor)
      try:
        mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      except (NotImplementedError, ValueError, AssertionError):
        continue
      found.append(shape)
      if len(found) == limit:
        return found
  return found


def _hybrid_grid(shape: tuple[int, ...], dcn: int, devices: list) -> np.ndarray:
  """Multi-slice (or multi-process, off TPU) grid: the data axis is `dcn` slices wide."""
  by_slice = hasattr(devices[0], "slice_index")
  groups = len({d.slice_index if by_slice else d.process_index for d in devices})
  what = "TPU slices" if by_slice else "processes"
  if groups != dcn:
    raise MeshError(f"mesh.{DCN_KEY}={dcn} but the devices come from {groups} {what}; set it "
                    f"to the number of {what}")
  ici = (shape[0] // dcn,) + tuple(shape[1:])
  try:
    return mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices,
                                                process_is_granule=not by_slice,
                                                allow_split_physical_axes=True)
  except (NotImplementedError, ValueError, AssertionError) as e:
    raise MeshError(f"per-slice mesh {dict(zip(MESH_AXES, ici))} x {dcn} {what} cannot be laid "
                    f"out: {e}") from e


def _mesh_axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_pspec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                     rules: Mapping[str, Any] = LOGICAL_RULES) -> P:
  """Maps logical axis names to a PartitionSpec; non-divisible dims and reused axes replicate."""
  if not logical:
    return P()
  if len(logical) != len(shape):
    raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    axes = rules.get(name) if name is not None else None
    if axes is not None:
      axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes)
      # Drop mesh axes of size 1 (cleaner specs) and axes already used by another dim.
      axes_tuple = tuple(a for a in axes_tuple if mesh.shape[a] > 1 and a not in used)
      # The longest leading run of those axes that divides the dim ('image_batch' of 96 on
      # fsdp=16 x tensor=4 -> fsdp, leaving tensor to the image rows).
      while axes_tuple and dim % _mesh_axis_size(mesh, axes_tuple):
        axes_tuple = axes_tuple[:-1]
      if not axes_tuple:
        axes = None
      else:
        used.update(axes_tuple)
        axes = axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple
    spec.append(axes)
  return P(*spec)


def _logical_names(variable: nnx.Variable):
  meta = variable.get_metadata()
  for key in ("out_sharding", "sharding_names", "sharding"):
    if meta.get(key):
      return tuple(meta[key])
  return None


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """NamedSharding for every leaf of an (abstract) NNX state, from its logical axis names."""

  def leaf_sharding(variable):
    value = variable.get_value() if hasattr(variable, "get_value") else variable.value
    names = _logical_names(variable)
    return variable.replace(NamedSharding(mesh, logical_to_pspec(names, value.shape, mesh)))

  return jax.tree.map(leaf_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dim over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names under the current mesh; no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_pspec(logical, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_local_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's local batch slice into one global array sharded over batch."""
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "OUS":  # strings stay on the host
      continue
    sharding = batch_sharding(mesh, value.ndim)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
