"""A structured attention mask: a static pattern and-ed with per-example key validity.

mask[b, h, i, j] = pattern[i, j] & keys[b, j] (True = attend). `pattern` is a numpy array
fixed at trace time (causal text, a sliding window) and `keys` a traced (batch, kv_len)
boolean array (text padding, hidden source tokens). Every mask the models build has this form,
and the form is what the splash kernel takes: the pattern becomes the kernel's static block mask
and the key validity its segment ids. The xla and cudnn implementations use `dense()`.

The object stands in for the dense (batch or 1, 1, q_len or 1, kv_len) array it describes:
`shape` and basic slicing of the query and key axes (`mask[:, :, a:]`, `mask[..., a:]`) behave
as on that array.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class _Pattern:
  """A hashable wrapper of a 2-D boolean numpy array (pytree auxiliary data)."""

  def __init__(self, array: np.ndarray):
    self.array = np.asarray(array, bool)
    self._key = (self.array.shape, self.array.tobytes())

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Pattern) and self._key == other._key


@jax.tree_util.register_pytree_node_class
class AttentionMask:
  """pattern (q_len, kv_len) numpy bool or None & keys (batch, kv_len) bool or None."""

  def __init__(self, keys: jax.Array | None = None, pattern: np.ndarray | None = None, *,
               kv_len: int | None = None):
    if keys is None and pattern is None:
      raise ValueError("AttentionMask needs keys, a pattern or both (a full mask is None)")
    if pattern is not None:
      if isinstance(pattern, jax.core.Tracer):
        raise ValueError("AttentionMask pattern must be a static numpy array, not a traced one")
      pattern = np.asarray(pattern)
      if pattern.ndim != 2 or pattern.dtype != np.bool_:
        raise ValueError(f"AttentionMask pattern must be 2-D boolean (q_len, kv_len), got "
                         f"{pattern.dtype} {pattern.shape}")
    if keys is not None:
      keys = jnp.asarray(keys)
      if keys.ndim != 2 or keys.dtype != jnp.bool_:
        raise ValueError(f"AttentionMask keys must be 2-D boolean (batch, kv_len), got "
                         f"{keys.dtype} {keys.shape}")
    lengths = {n for n in (kv_len, None if keys is None else keys.shape[1],
                           None if pattern is None else pattern.shape[1]) if n is not None}
    if len(lengths) != 1:
      shapes = [None if a is None else a.shape for a in (keys, pattern)]
      raise ValueError(f"AttentionMask key lengths disagree: kv_len={kv_len}, keys shape "
                       f"{shapes[0]}, pattern shape {shapes[1]}")
    self.keys = keys
    self.pattern = pattern
    self.kv_len = lengths.pop()

  # ---- pytree ---------------------------------------------------------------------------
  def tree_flatten(self):
    aux = (None if self.pattern is None else _Pattern(self.pattern), self.kv_len)
    return (self.keys,), aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    mask = object.__new__(cls)
    pattern, mask.kv_len = aux
    mask.pattern = None if pattern is None else pattern.array
    mask.keys = children[0]
    return mask

  # ---- the dense array it stands for ------------------------------------------------------
  @property
  def shape(self) -> tuple[int, int, int, int]:
    batch = 1 if self.keys is None else self.keys.shape[0]
    q_len = 1 if self.pattern is None else self.pattern.shape[0]
    return (batch, 1, q_len, self.kv_len)

  @property
  def ndim(self) -> int:
    return 4

  @property
  def dtype(self):
    return jnp.bool_

  def dense(self) -> jax.Array:
    """The boolean (batch or 1, 1, q_len or 1, kv_len) array."""
    out = None
    if self.pattern is not None:
      out = jnp.asarray(self.pattern)[None, None]
    if self.keys is not None:
      keys = self.keys[:, None, None, :]
      out = keys if out is None else out & keys
    return out

  def __getitem__(self, index) -> "AttentionMask":
    """Basic slices of the query (2) and key (3) axes; the batch and head axes stay whole."""
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
      at = index.index(Ellipsis)
      index = index[:at] + (slice(None),) * (4 - len(index) + 1) + index[at + 1:]
    index = index + (slice(None),) * (4 - len(index))
    if len(index) != 4 or not all(isinstance(i, slice) and i.step in (None, 1) for i in index):
      raise IndexError(f"AttentionMask supports basic slices of its 4 axes only, got {index}")
    if index[0] != slice(None) or index[1] != slice(None):
      raise IndexError("AttentionMask slices only its query and key axes (2 and 3)")
    rows, cols = index[2], index[3]
    pattern = self.pattern
    if pattern is None:
      if len(range(1)[rows]) != 1:
        raise IndexError(f"slice {rows} of a mask that is broadcast over queries selects none")
    else:
      pattern = pattern[rows, cols]
    keys = None if self.keys is None else self.keys[:, cols]
    kv_len = len(range(self.kv_len)[cols])
    return AttentionMask(keys, pattern, kv_len=kv_len)
