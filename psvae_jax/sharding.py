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
  anything else (seq, act_embed, layers, norm, conv_in, None) -> replicated

A dimension whose size is not divisible by the mesh axes it maps to is replicated instead, so
small models run on any mesh.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
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
}


class MeshError(UserError, ValueError):
  """The configured mesh cannot be built on the available devices."""


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves axis sizes (-1 = fill with the remaining devices) and checks the product."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise MeshError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
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
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh with Auto axis types (GSPMD propagation)."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


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
      if not axes_tuple or dim % _mesh_axis_size(mesh, axes_tuple):
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
