"""Names of pytree and NNX state paths: the one way the project spells a parameter's path.

`jax.tree_util` paths hold key objects (DictKey .key, SequenceKey .idx, GetAttrKey .name);
`nnx.to_flat_state` paths hold plain strings and ints. Both name the same parameter the same
way here, e.g. ('encoder', 'blocks', 0, 'kernel') -> 'encoder.blocks.0.kernel'.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax


def path_keys(path: Sequence) -> tuple[str, ...]:
  """Each entry of a pytree or NNX path as a string: ('encoder', 'blocks', '0', 'kernel')."""
  return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def path_str(path: Sequence) -> str:
  """Dotted name of a pytree or NNX path: 'encoder.blocks.0.kernel'."""
  return ".".join(path_keys(path))


def flatten_dotted(tree: Any) -> dict[str, Any]:
  """{dotted path: leaf} of a pytree (list indices become '0', '1', ...)."""
  return {path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
