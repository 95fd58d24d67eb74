"""Meshes on TPU tori and multi-slice hybrid meshes, built from libtpu's compile-only devices
(no TPU attached, nothing compiled: each case takes milliseconds)."""
import importlib.util
import logging

import pytest

from psvae_jax import sharding

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install libtpu==0.0.42.1)")


def _devices(spec: str, slices: int = 1):
  from psvae_jax.tools import aot
  return aot.topology_devices(aot.parse_topology(spec), num_slices=slices)


@pytest.mark.parametrize("shape", [(1, 32, 2), (2, 16, 2), (1, 8, 8), (1, 16, 4), (64, 1, 1)])
def test_any_shape_builds_on_a_4x4x4_torus(shape, caplog):
  devices = _devices("v5p:4x4x4")
  with caplog.at_level(logging.INFO):
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), devices)
  assert tuple(mesh.shape.values()) == shape
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
  # (1, 32, 2) and (2, 16, 2) cannot use whole physical axes of a 4x4x4 torus.
  split = shape[2] in (2, 8)
  assert ("split physical axes" in caplog.text) == split


def test_unlayable_devices_name_workable_shapes():
  devices = _devices("v5p:4x4x4")[:6]  # not a sub-torus of the slice
  with pytest.raises(sharding.MeshError, match="workable"):
    sharding.make_mesh({"data": 2, "fsdp": 3, "tensor": 1}, devices)


def test_two_slices_make_a_hybrid_mesh():
  devices = _devices("v5p:2x2x2", slices=2)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 2, "dcn_data": 2}, devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 2}
  # Each data row is one whole slice: fsdp and tensor collectives stay on ICI.
  assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]


def test_dcn_size_must_match_the_slices():
  devices = _devices("v5p:2x2x2", slices=2)
  with pytest.raises(sharding.MeshError, match="2 TPU slices"):
    sharding.make_mesh({"data": 4, "fsdp": 4, "tensor": 1, "dcn_data": 4}, devices)
  with pytest.raises(sharding.MeshError, match="divisor of the data axis"):
    sharding.make_mesh({"data": 1, "fsdp": 16, "tensor": 1, "dcn_data": 2}, devices)
