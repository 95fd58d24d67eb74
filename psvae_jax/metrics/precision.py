"""Evaluation at full precision: matmuls and convolutions at `Precision.HIGHEST` (float32).

Without it the backend's default applies: one bfloat16 pass on TPU, TF32 on recent GPUs, so a
metric (rFID, LPIPS, the linear probe) would differ by backend. `full_precision(fn)` traces `fn`
under `jax.default_matmul_precision('highest')`, which sets the precision of every dot and
convolution that does not name its own; apply it to the function that `jax.jit` traces.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import jax

F = TypeVar("F", bound=Callable)


def full_precision(fn: F) -> F:
  """`fn` with its dots and convolutions at highest precision (see the module doc)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)

  return wrapped
