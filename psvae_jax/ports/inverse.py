"""The inverse of a port's name/layout map, derived from the forward map itself.

A forward map (`tensors -> ({module param path: array}, TensorPool)`) renames, transposes,
stacks, splits and squeezes checkpoint tensors into module parameters. Running it once on
*probe* tensors, whose entries are their own element indices, tells for every parameter element
which checkpoint element it came from; writing the module's values back through those indices
gives the checkpoint. Export therefore has no second name table that could drift from import.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from psvae_jax.ports.common import TensorPool, WeightLoadError

ForwardMap = Callable[[dict], "tuple[dict, TensorPool]"]


def invert(forward: ForwardMap, source_shapes: Mapping[str, tuple[int, ...]],
           params: Mapping[str, np.ndarray], *, what: str,
           fixed: Mapping[str, np.ndarray] | None = None,
           unused: Callable[[str, tuple[int, ...]], np.ndarray] | None = None
           ) -> dict[str, np.ndarray]:
  """Checkpoint tensors {name: float32 array} whose forward map gives `params`.

  Args:
    forward: the port's map from checkpoint tensors to {param path: array} and its pool.
    source_shapes: every tensor the reference library's model holds, with its shape.
    params: the module's parameters {dotted path: array}.
    what: names the model in errors.
    fixed: tensors the forward map only checks (e.g. a constant position table): given to it
      as they are and written out unchanged.
    unused: value for a tensor the forward map deliberately drops (e.g. a pretraining-only
      mask token); without it such a tensor is an error.
  Raises WeightLoadError when the map does not cover the module exactly: a parameter with no
  source, a source element written twice or never, a shape or a name that does not match.
  """
  fixed = dict(fixed or {})
  probes, offset = {}, 0
  for name, shape in source_shapes.items():
    if name in fixed:
      probes[name] = np.asarray(fixed[name])
      continue
    size = int(np.prod(shape, dtype=np.int64))
    probes[name] = np.arange(offset, offset + size, dtype=np.int64).reshape(shape)
    offset += size
  targets, pool = forward(probes)
  problems = []
  if pool.missing:
    problems.append(f"the map asks for tensors the reference model lacks: "
                    f"{sorted(set(pool.missing))[:10]}")
  if pool.leftover():
    problems.append(f"reference tensors the map does not use: {pool.leftover()[:10]}")
  extra = sorted(set(targets) - set(params))
  absent = sorted(set(params) - set(targets))
  if extra:
    problems.append(f"mapped parameters the module lacks: {extra[:10]}")
  if absent:
    problems.append(f"module parameters the map does not fill: {absent[:10]}")
  if problems:
    raise WeightLoadError(f"cannot export {what}:\n  " + "\n  ".join(problems))

  flat = np.zeros(offset, np.float32)
  written = np.zeros(offset, np.int32)
  for path, index in targets.items():
    index = np.asarray(index)
    value = np.asarray(params[path], np.float32)
    if index.dtype.kind not in "iu":
      raise WeightLoadError(f"cannot export {what}: the map computes {path} from values, "
                            "not by moving them (no inverse)")
    if index.shape != value.shape:
      raise WeightLoadError(f"cannot export {what}: {path} is {value.shape} in the module but "
                            f"{index.shape} in the map")
    flat[index.ravel()] = value.ravel()
    np.add.at(written, index.ravel(), 1)

  out, offset = {}, 0
  for name, shape in source_shapes.items():
    if name in fixed:
      out[name] = np.asarray(fixed[name], np.float32).reshape(shape)
      continue
    size = int(np.prod(shape, dtype=np.int64))
    counts = written[offset:offset + size]
    if np.all(counts == 1):
      out[name] = flat[offset:offset + size].reshape(shape)
    elif np.all(counts == 0) and unused is not None:
      out[name] = np.asarray(unused(name, tuple(shape)), np.float32)
    else:
      state = "never written" if np.all(counts == 0) else "partly or repeatedly written"
      raise WeightLoadError(f"cannot export {what}: reference tensor {name} is {state}")
    offset += size
  return out


def zeros_or_ones(name: str, shape: tuple[int, ...]) -> np.ndarray:
  """An unused tensor's neutral value: ones for a norm's weight, zeros otherwise."""
  leaf = name.rsplit(".", 2)
  is_norm_weight = leaf[-1] == "weight" and "norm" in leaf[-2]
  return np.ones(shape, np.float32) if is_norm_weight else np.zeros(shape, np.float32)


def flat_params(module) -> dict[str, np.ndarray]:
  """{dotted path: host float32 array} of a module's nnx.Param variables."""
  import jax
  from flax import nnx

  return {".".join(str(getattr(p, "key", p)) for p in path):
          np.asarray(jax.device_get(v.get_value()), np.float32)
          for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
