"""Ported weights stored once as an Orbax checkpoint, restored by training stages.

Layout of a converted directory (written by `python -m psvae_jax.tools.convert`):
  DIR/port_config.json  {"format": 1, "kind": "vision"|"text", "model_type": <transformers
                        model_type>, "config": <EncoderConfig / TextEncoderConfig fields>,
                        "source": <checkpoint path>}
  DIR/params            Orbax StandardCheckpointer tree: the module's nnx.Param state as a pure
                        dict in the unscanned layout ('blocks.blocks.<i>...', 'layers.<i>...').
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from psvae_jax.models.encoders import EncoderConfig, VisionEncoder
from psvae_jax.models.text_encoder import TextEncoder, TextEncoderConfig
from psvae_jax.ports.common import WeightLoadError, read_json
from psvae_jax.tree_paths import flatten_dotted, path_str

FORMAT_VERSION = 1
CONFIG_NAME = "port_config.json"
PARAMS_NAME = "params"


def _stack_name(config) -> str:
  return "blocks.blocks" if isinstance(config, EncoderConfig) else "layers"


def port_config_dict(module: VisionEncoder | TextEncoder, *, model_type: str,
                     source: str = "") -> dict:
  kind = "vision" if isinstance(module, VisionEncoder) else "text"
  return {"format": FORMAT_VERSION, "kind": kind, "model_type": model_type,
          "config": module.config.to_dict(), "source": source}


def config_from_port_config(port_config: dict, where: str = CONFIG_NAME):
  if port_config.get("format") != FORMAT_VERSION:
    raise WeightLoadError(f"{where}: unsupported format {port_config.get('format')!r} "
                          f"(expected {FORMAT_VERSION})")
  kind = port_config.get("kind")
  try:
    if kind == "vision":
      return EncoderConfig.from_dict(port_config["config"])
    if kind == "text":
      return TextEncoderConfig.from_dict(port_config["config"])
  except (KeyError, TypeError, ValueError) as e:
    raise WeightLoadError(f"{where}: invalid module config ({e})") from e
  raise WeightLoadError(f"{where}: unknown kind {kind!r} (expected 'vision' or 'text')")


def save_converted(module: VisionEncoder | TextEncoder, out_dir: str, *, model_type: str,
                   source: str = "") -> None:
  """Writes DIR/port_config.json and DIR/params (unscanned module required)."""
  if getattr(module, "scan_layers", False) or getattr(getattr(module, "blocks", None),
                                                       "scan_layers", False):
    raise ValueError("save_converted stores the unscanned layout; build the module with "
                     "scan_layers=False")
  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  params = nnx.state(module, nnx.Param).to_pure_dict()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out_dir, PARAMS_NAME), params, force=True)
  checkpointer.wait_until_finished()
  with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
    json.dump(port_config_dict(module, model_type=model_type, source=source), f, indent=2)


def restore_params(module: VisionEncoder | TextEncoder, directory: str, *,
                   shardings: Callable[[nnx.State], nnx.State] | None = None) -> None:
  """Restores DIR/params into `module`'s parameters (in place).

  The stored tree must match the module's parameters exactly (same paths, same shapes);
  otherwise one WeightLoadError names every missing, unexpected and mis-shaped entry. A module
  built with scan_layers=True receives the per-layer tensors stacked. With `shardings` (the
  module's parameter state -> the same tree of shardings, e.g. `sharding.state_shardings` on a
  mesh), each parameter is restored directly into its sharding.
  """
  import orbax.checkpoint as ocp
  path = os.path.join(os.path.abspath(directory), PARAMS_NAME)
  if not os.path.isdir(path):
    raise WeightLoadError(f"{directory}: no '{PARAMS_NAME}' checkpoint found")
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata
  stored = flatten_dotted(getattr(metadata, "tree", metadata))
  param_state = nnx.state(module, nnx.Param)
  expected = flatten_dotted(param_state.to_pure_dict())
  scanned = _is_scanned(module)
  if scanned:
    stored_shapes = _stacked_shapes(stored, _stack_name(module.config), module.config.depth)
  else:
    stored_shapes = {k: tuple(v.shape) for k, v in stored.items()}
  problems = []
  missing = sorted(set(expected) - set(stored_shapes))
  unexpected = sorted(set(stored_shapes) - set(expected))
  if missing:
    problems.append(f"missing in checkpoint: {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected in checkpoint: {', '.join(unexpected)}")
  mis_shaped = [f"{k}: checkpoint {stored_shapes[k]} vs model {tuple(expected[k].shape)}"
                for k in sorted(set(expected) & set(stored_shapes))
                if stored_shapes[k] != tuple(expected[k].shape)]
  if mis_shaped:
    problems.append("mis-shaped: " + "; ".join(mis_shaped))
  if problems:
    raise WeightLoadError(f"cannot restore {path}:\n  " + "\n  ".join(problems))

  if shardings is not None:
    shardings = flatten_dotted(nnx.to_pure_dict(shardings(param_state)))
  if scanned:
    restored = flatten_dotted(checkpointer.restore(path, _abstract(stored, None)))
    restored = _stack_flat(restored, _stack_name(module.config), module.config.depth)
    if shardings is not None:
      restored = {k: jax.device_put(v, shardings[k]) for k, v in restored.items()}
  else:
    target = _abstract(stored, shardings)
    restored = flatten_dotted(checkpointer.restore(path, target))
  for key, variable in _flat_vars(param_state).items():
    value = restored[key]
    variable.set_value(value.astype(variable.get_value().dtype))


def _abstract(stored: dict, shardings: dict | None) -> dict:
  """Nested restore target of ShapeDtypeStructs (float32) from flat stored metadata."""
  tree: dict = {}
  for key, meta in stored.items():
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    sharding = shardings.get(key) if shardings else None
    node[parts[-1]] = jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=sharding)
  return tree


def _flat_vars(state: nnx.State) -> dict[str, nnx.Variable]:
  return {path_str(path): v for path, v in nnx.to_flat_state(state)}


def _is_scanned(module) -> bool:
  if isinstance(module, VisionEncoder):
    return bool(module.blocks.scan_layers)
  return bool(module.scan_layers)


def _split_layer_key(key: str, stack: str):
  head = stack + "."
  if key.startswith(head):
    index, _, rest = key[len(head):].partition(".")
    if index.isdigit():
      return int(index), rest
  return None, None


def _stacked_shapes(stored: dict, stack: str, depth: int) -> dict[str, tuple]:
  shapes, layers = {}, {}
  for key, meta in stored.items():
    index, rest = _split_layer_key(key, stack)
    if index is None:
      shapes[key] = tuple(meta.shape)
    else:
      layers.setdefault(rest, {})[index] = tuple(meta.shape)
  for rest, per_layer in layers.items():
    name = f"{stack}.{rest}"
    if sorted(per_layer) != list(range(depth)) or len(set(per_layer.values())) != 1:
      shapes[name] = ("layers", tuple(sorted(per_layer.items())))  # reported as mis-shaped
    else:
      shapes[name] = (depth,) + per_layer[0]
  return shapes


def _stack_flat(flat: dict, stack: str, depth: int) -> dict:
  out, layers = {}, {}
  for key, value in flat.items():
    index, rest = _split_layer_key(key, stack)
    if index is None:
      out[key] = value
    else:
      layers.setdefault(rest, {})[index] = value
  for rest, per_layer in layers.items():
    out[f"{stack}.{rest}"] = jnp.stack([per_layer[i] for i in range(depth)])
  return out


def load_converted(directory: str, *, dtype: Any = jnp.float32, attention_impl: str = "xla",
                   scan_layers: bool = False,
                   shardings: Callable[[nnx.State], nnx.State] | None = None
                   ) -> VisionEncoder | TextEncoder:
  """Rebuilds the module described by DIR/port_config.json and restores DIR/params into it
  (`shardings` as in `restore_params`)."""
  where = os.path.join(directory, CONFIG_NAME)
  config = config_from_port_config(read_json(where), where)
  cls = VisionEncoder if isinstance(config, EncoderConfig) else TextEncoder
  module = nnx.eval_shape(lambda: cls(config, attention_impl=attention_impl,
                                      scan_layers=scan_layers, dtype=dtype, rngs=nnx.Rngs(0)))
  restore_params(module, directory, shardings=shardings)
  return module
