"""Named rematerialisation (gradient checkpointing) policies, one table for every model.

A policy name says which activations of a checkpointed block are kept for the backward pass;
everything else is recomputed there:
  ''               no rematerialisation (keep every activation)
  'full'           keep nothing but the block's inputs
  'dots'           keep matmul outputs (`jax.checkpoint_policies.dots_saveable`)
  'dots_no_batch'  keep matmul outputs without batch dimensions (weights-only matmuls; the
                   attention matmuls are recomputed)
Models take `remat` as a name, or as a bool for the full policy (True = 'full', False = '').
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

POLICIES = {
    "full": None,  # jax.checkpoint's default: save nothing
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
NAMES = ("",) + tuple(POLICIES)


def policy_name(remat: bool | str | None, *, what: str = "remat") -> str:
  """The policy name of `remat` ('' for none); unknown names are a ValueError naming `what`."""
  if remat is None or remat is False:
    return ""
  if remat is True:
    return "full"
  if isinstance(remat, str) and remat in NAMES:
    return remat
  raise ValueError(f"unknown {what} {remat!r}; expected a bool or one of {list(NAMES)}")


def checkpoint(fn: Callable, remat: bool | str | None) -> Callable:
  """`fn` under `jax.checkpoint` with the named policy (`fn` itself for '')."""
  name = policy_name(remat)
  return jax.checkpoint(fn, policy=POLICIES[name]) if name else fn


def nnx_checkpoint(fn: Callable, remat: bool | str | None) -> Callable:
  """`checkpoint` for functions taking NNX modules (`nnx.remat`)."""
  name = policy_name(remat)
  return nnx.remat(fn, policy=POLICIES[name]) if name else fn
