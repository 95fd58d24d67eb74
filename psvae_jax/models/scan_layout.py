"""Converts parameter trees between the unscanned and the scanned layer layout.

Unscanned stacks hold one subtree per layer under integer keys (`blocks.blocks.<i>.*` of the
ViT encoders and E_s / D_s, `layers.<i>.*` of the text encoder, `ddt_head.blocks.<i>.*`);
scanned ones hold one subtree whose leaves carry a leading [layers] axis. The MMDiT keeps its
unscanned blocks as `blocks.<i>` and its scanned ones as `block_groups.<g>`, one stacked group
per run of identical blocks, in order. The ports and converted checkpoints store the
unscanned layout; `match_scan_layout` brings such a tree into whatever layout a model has.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

# (unscanned key, scanned key) where a stack is stored as consecutive stacked groups.
GROUPED_STACKS = (("blocks", "block_groups"),)


class ScanLayoutError(ValueError):
  """The two trees differ in more than the layer layout."""


def match_scan_layout(params: Any, like: Any) -> dict:
  """`params` rearranged into the layer layout of `like` (stacking or unstacking layers).

  Args:
    params: a nested dict (or `nnx.State`) of arrays, in either layout.
    like: the target's tree (arrays or `jax.ShapeDtypeStruct`s, e.g. `nnx.eval_shape` state):
      only its structure and shapes are read.
  Returns a nested dict with `like`'s keys and shapes; values keep their dtypes. Raises
  ScanLayoutError naming the first path where the trees differ otherwise (missing or
  unexpected keys, layer counts, shapes).
  """
  return _match(_pure(params), _pure(like), "")


def _pure(tree: Any) -> Any:
  return tree.to_pure_dict() if hasattr(tree, "to_pure_dict") else tree


def _is_node(x: Any) -> bool:
  return isinstance(x, Mapping)


def _index(key: Any) -> int | None:
  if isinstance(key, int):
    return key
  if isinstance(key, str) and key.isdigit():
    return int(key)
  return None


def _layer_keys(node: Mapping) -> list | None:
  """The keys of a per-layer list (0..N-1, ints or digit strings) in order, else None."""
  if not node:
    return None
  indices = {_index(k): k for k in node}
  if None in indices or sorted(indices) != list(range(len(node))):
    return None
  return [indices[i] for i in range(len(node))]


def _join(path: str, key: Any) -> str:
  return f"{path}.{key}" if path else str(key)


def _leading(like: Any, path: str) -> int:
  sizes = {tuple(leaf.shape)[0] if leaf.shape else None for leaf in jax.tree.leaves(like)}
  if len(sizes) != 1 or None in sizes:
    raise ScanLayoutError(f"{path}: the stacked subtree has no common leading layer axis "
                          f"(leading sizes {sorted(map(str, sizes))})")
  return sizes.pop()


def _drop_leading(like: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape)[1:], x.dtype), like)


def _stack(layers: list, like: Any, path: str) -> Any:
  """Per-layer subtrees -> one subtree of `like`'s stacked shapes."""
  if len(layers) != _leading(like, path):
    raise ScanLayoutError(f"{path}: {len(layers)} layers but the model stacks "
                          f"{_leading(like, path)}")
  per_layer = _drop_leading(like)
  matched = [_match(layer, per_layer, f"{path}[{i}]") for i, layer in enumerate(layers)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *matched)


def _unstack(stacked: Any, likes: list, path: str) -> list:
  """One stacked subtree -> per-layer subtrees shaped as `likes`."""
  if len(likes) != _leading(stacked, path):
    raise ScanLayoutError(f"{path}: {_leading(stacked, path)} stacked layers but the model "
                          f"has {len(likes)}")
  return [_match(jax.tree.map(lambda x, i=i: x[i], stacked), like, f"{path}[{i}]")
          for i, like in enumerate(likes)]


def _match(src: Any, like: Any, path: str) -> Any:
  if not _is_node(like):
    if _is_node(src):
      raise ScanLayoutError(f"{path}: a subtree where the model has an array")
    if tuple(src.shape) != tuple(like.shape):
      raise ScanLayoutError(f"{path}: shape {tuple(src.shape)} vs model {tuple(like.shape)}")
    return src
  if not _is_node(src):
    raise ScanLayoutError(f"{path}: an array where the model has a subtree")
  src_layers, like_layers = _layer_keys(src), _layer_keys(like)
  if src_layers is not None and like_layers is None:
    return _stack([src[k] for k in src_layers], like, path)
  if like_layers is not None and src_layers is None:
    return dict(zip(like_layers, _unstack(src, [like[k] for k in like_layers], path)))
  if src_layers is not None:  # both per-layer lists
    if len(src_layers) != len(like_layers):
      raise ScanLayoutError(f"{path}: {len(src_layers)} layers vs model {len(like_layers)}")
    return {lk: _match(src[sk], like[lk], _join(path, lk))
            for sk, lk in zip(src_layers, like_layers)}
  src = _regroup(dict(src), like, path)
  missing = [_join(path, k) for k in like if k not in src]
  unexpected = [_join(path, k) for k in src if k not in like]
  if missing or unexpected:
    raise ScanLayoutError("; ".join(
        ([f"missing {', '.join(map(str, missing))}"] if missing else [])
        + ([f"unexpected {', '.join(map(str, unexpected))}"] if unexpected else [])))
  return {k: _match(src[k], like[k], _join(path, k)) for k in like}


def _regroup(src: dict, like: Mapping, path: str) -> dict:
  """Converts a GROUPED_STACKS pair (per-layer list <-> consecutive stacked groups)."""
  for flat, grouped in GROUPED_STACKS:
    if flat in src and grouped in like and flat not in like and grouped not in src:
      layers_node, groups_like = src.pop(flat), like[grouped]
      layer_keys, group_keys = _layer_keys(layers_node), _layer_keys(groups_like)
      if layer_keys is None or group_keys is None:
        raise ScanLayoutError(f"{_join(path, flat)} / {_join(path, grouped)}: not layer lists")
      sizes = [_leading(groups_like[g], _join(path, f"{grouped}.{g}")) for g in group_keys]
      if sum(sizes) != len(layer_keys):
        raise ScanLayoutError(f"{_join(path, flat)}: {len(layer_keys)} layers but the model's "
                              f"groups hold {sum(sizes)} ({sizes})")
      out, start = {}, 0
      for g, size in zip(group_keys, sizes):
        out[g] = [layers_node[k] for k in layer_keys[start:start + size]]
        start += size
      src[grouped] = {g: _stack(out[g], groups_like[g], _join(path, f"{grouped}.{g}"))
                      for g in group_keys}
    elif grouped in src and flat in like and grouped not in like and flat not in src:
      groups_node, layers_like = src.pop(grouped), like[flat]
      group_keys, layer_keys = _layer_keys(groups_node), _layer_keys(layers_like)
      if layer_keys is None or group_keys is None:
        raise ScanLayoutError(f"{_join(path, grouped)} / {_join(path, flat)}: not layer lists")
      layers, start = [], 0
      for g in group_keys:
        size = _leading(groups_node[g], _join(path, f"{grouped}.{g}"))
        likes = [layers_like[k] for k in layer_keys[start:start + size]]
        layers += _unstack(groups_node[g], likes, _join(path, f"{grouped}.{g}"))
        start += size
      if start != len(layer_keys):
        raise ScanLayoutError(f"{_join(path, grouped)}: {start} stacked layers but the model "
                              f"has {len(layer_keys)}")
      src[flat] = dict(zip(layer_keys, layers))
  return src
