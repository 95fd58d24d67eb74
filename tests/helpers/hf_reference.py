"""Shared helpers of the transformers port tests: small random reference models and compares."""
from __future__ import annotations

import os

import numpy as np


def quiet_transformers():
  import transformers
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()


def save(model, path, **kwargs) -> str:
  """save_pretrained as safetensors into `path` and return it."""
  model.save_pretrained(path, safe_serialization=True, **kwargs)
  return str(path)


def pixels(batch, height, width, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


def torch_vision(model, x_nhwc: np.ndarray, **kwargs) -> np.ndarray:
  import torch
  with torch.inference_mode():
    out = model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous(), **kwargs)
  return out.last_hidden_state.numpy()


def edit_safetensors(path: str, edit) -> None:
  """Rewrites a checkpoint's model.safetensors with `edit(dict) -> dict` applied."""
  from safetensors.numpy import load_file, save_file
  file = os.path.join(path, "model.safetensors")
  tensors = edit(dict(load_file(file)))
  save_file(tensors, file, metadata={"format": "pt"})


def jitted(module, method=None):
  """A jitted forward of an NNX module (one compile per input shape; eager runs are slower)."""
  import jax
  from flax import nnx
  graphdef, state = nnx.split(module)

  def forward(state, *args):
    m = nnx.merge(graphdef, state)
    return (method(m, *args) if method else m(*args))

  compiled = jax.jit(forward)
  return lambda *args: compiled(state, *args)


def sharded_forward(module, *inputs):
  """Runs module(*inputs) under jit on a ('data'=2, 'fsdp'=4) mesh: batch over data+fsdp,
  parameters over fsdp from their logical names. Returns (output, the placed parameter state)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from psvae_jax.sharding import batch_sharding, make_mesh, state_shardings
  mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  graphdef, state = nnx.split(module)
  shardings = state_shardings(state, mesh)
  in_shardings = (shardings,) + tuple(batch_sharding(mesh, np.ndim(x)) for x in inputs)

  def forward(state, *args):
    return nnx.merge(graphdef, state)(*args)

  with jax.set_mesh(mesh):
    state = jax.device_put(state, shardings)
    args = [jax.device_put(jnp.asarray(x), s) for x, s in zip(inputs, in_shardings[1:])]
    out = jax.jit(forward, in_shardings=in_shardings,
                  out_shardings=batch_sharding(mesh, 3))(state, *args)
  return out, state
