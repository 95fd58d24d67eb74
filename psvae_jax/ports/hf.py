"""transformers checkpoints -> Flax NNX modules (DINOv2, DINOv2 with registers, SigLIP, Qwen2).

`load(path)` reads `config.json` and the safetensors weights (single file or sharded with an
index) of a local transformers checkpoint directory and returns:
  vision (dinov2, dinov2_with_registers, siglip, siglip_vision_model): a `VisionEncoder`;
    `module(pixel_values)` with NHWC float32 pixels normalised as the HF processor does returns
    transformers' `last_hidden_state`.
  text (qwen2): a `TextEncoder`; `module(input_ids, attention_mask)` returns `last_hidden_state`.
Every checkpoint tensor must be used or explicitly ignored (mask token, SigLIP text tower and
pooling head, lm_head), every parameter must be filled and shapes must agree; otherwise one
WeightLoadError lists all problems.

Both the names `save_pretrained` writes (DINOv2's `attention.attention.query`, fused SwiGLU
`mlp.weights_in`) and transformers' in-memory names (`attention.q_proj`, `mlp.gate_proj`) are
accepted.
"""
from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.models.encoders import (IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD,
                                       EncoderConfig, VisionEncoder)
from psvae_jax.models.text_encoder import TextEncoder, TextEncoderConfig
from psvae_jax.ports.common import TensorPool, WeightLoadError, assign, read_json, read_safetensors

VISION_TYPES = ("dinov2", "dinov2_with_registers", "siglip", "siglip_vision_model")
TEXT_TYPES = ("qwen2",)
SUPPORTED_TYPES = VISION_TYPES + TEXT_TYPES
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def _square(value, what: str, path: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise WeightLoadError(f"{path}: only square {what} is supported, got {value}")
    value = value[0]
  return int(value)


def _mlp_type(act: str, path: str) -> str:
  if act == "gelu":
    return "gelu"
  if act in _TANH_GELUS:
    return "gelu_tanh"
  raise WeightLoadError(f"{path}: unsupported hidden_act {act!r} (expected 'gelu' or one of "
                        f"{_TANH_GELUS})")


def read_config(path: str) -> dict:
  """config.json of a checkpoint directory, checking that its model_type is supported."""
  config = read_json(os.path.join(path, "config.json"))
  model_type = config.get("model_type")
  if model_type not in SUPPORTED_TYPES:
    raise WeightLoadError(f"{path}: unsupported model_type {model_type!r}; supported: "
                          f"{', '.join(SUPPORTED_TYPES)}")
  return config


def module_config(hf_config: dict, path: str = "checkpoint") -> EncoderConfig | TextEncoderConfig:
  """The project's module config equivalent to a transformers config.json dict."""
  model_type = hf_config.get("model_type")
  if model_type in ("dinov2", "dinov2_with_registers"):
    c = hf_config
    width = int(c.get("hidden_size", 768))
    swiglu = bool(c.get("use_swiglu_ffn", False))
    hidden = int(width * c.get("mlp_ratio", 4))
    mlp_dim = (int(hidden * 2 / 3) + 7) // 8 * 8 if swiglu else hidden
    registers = int(c.get("num_register_tokens", 0)) if model_type != "dinov2" else 0
    return EncoderConfig(
        family="dinov2", width=width, depth=int(c.get("num_hidden_layers", 12)),
        num_heads=int(c.get("num_attention_heads", 12)), mlp_dim=mlp_dim,
        patch_size=_square(c.get("patch_size", 14), "patch_size", path),
        image_size=_square(c.get("image_size", 224), "image_size", path),
        num_channels=int(c.get("num_channels", 3)), num_register_tokens=registers,
        mlp_type="swiglu" if swiglu else _mlp_type(c.get("hidden_act", "gelu"), path),
        layer_scale_init=float(c.get("layerscale_value", 1.0)),
        norm_eps=float(c.get("layer_norm_eps", 1e-6)), qkv_bias=bool(c.get("qkv_bias", True)),
        # transformers interpolates with antialias only in the registers variant.
        pos_antialias=model_type == "dinov2_with_registers",
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
  if model_type in ("siglip", "siglip_vision_model"):
    c = hf_config.get("vision_config") if model_type == "siglip" else hf_config
    if not isinstance(c, dict):
      raise WeightLoadError(f"{path}: siglip config has no 'vision_config' object")
    return EncoderConfig(
        family="siglip", width=int(c.get("hidden_size", 768)),
        depth=int(c.get("num_hidden_layers", 12)), num_heads=int(c.get("num_attention_heads", 12)),
        mlp_dim=int(c.get("intermediate_size", 3072)),
        patch_size=_square(c.get("patch_size", 16), "patch_size", path),
        image_size=_square(c.get("image_size", 224), "image_size", path),
        num_channels=int(c.get("num_channels", 3)),
        mlp_type=_mlp_type(c.get("hidden_act", "gelu_pytorch_tanh"), path),
        layer_scale_init=None, norm_eps=float(c.get("layer_norm_eps", 1e-6)), qkv_bias=True,
        pos_antialias=False, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
  if model_type == "qwen2":
    c = hf_config
    if c.get("hidden_act", "silu") != "silu":
      raise WeightLoadError(f"{path}: unsupported Qwen2 hidden_act {c.get('hidden_act')!r}")
    rope = c.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = c.get("rope_scaling")
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type"))
                                  not in (None, "default")):
      raise WeightLoadError(f"{path}: only default rotary embeddings are supported, got "
                            f"rope_parameters={rope} rope_scaling={scaling}")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    depth = int(c["num_hidden_layers"])
    window = c.get("sliding_window") if c.get("use_sliding_window", False) else None
    layer_types = c.get("layer_types")
    if layer_types is None:
      max_window_layers = int(c.get("max_window_layers", depth))
      layer_types = ["sliding_attention" if window is not None and i >= max_window_layers
                     else "full_attention" for i in range(depth)]
    heads = int(c["num_attention_heads"])
    return TextEncoderConfig(
        vocab_size=int(c["vocab_size"]), width=int(c["hidden_size"]), depth=depth,
        num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads") or heads),
        mlp_dim=int(c["intermediate_size"]), head_dim=c.get("head_dim"),
        rope_theta=float(theta), rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        sliding_window=int(window) if window else None, layer_types=tuple(layer_types))
  raise WeightLoadError(f"{path}: unsupported model_type {model_type!r}; supported: "
                        f"{', '.join(SUPPORTED_TYPES)}")


def build_module(config: EncoderConfig | TextEncoderConfig, *, dtype: Any = jnp.float32,
                 attention_impl: str = "xla", scan_layers: bool = False, abstract: bool = False
                 ) -> VisionEncoder | TextEncoder:
  """The module for a config; abstract=True gives shapes only (no random init), to be filled."""
  cls = VisionEncoder if isinstance(config, EncoderConfig) else TextEncoder
  make = lambda: cls(config, attention_impl=attention_impl, scan_layers=scan_layers,
                     dtype=dtype, rngs=nnx.Rngs(0))
  return nnx.eval_shape(make) if abstract else make()


# ---------------------------------------------------------------------------------------------
# Name / layout mapping.


def _first_present(pool: TensorPool, *names: str) -> str:
  """The first name the checkpoint has (or the first, so that `take` reports it missing)."""
  return next((n for n in names if n in pool), names[0])


def _t(x):  # torch Linear (out, in) -> (in, out)
  return None if x is None else np.ascontiguousarray(x.T)


def _conv(x):  # torch Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
  return None if x is None else np.ascontiguousarray(x.transpose(2, 3, 1, 0))


class _Unstackable:
  """Stand-in for tensors that cannot be stacked (differing shapes): `assign` reports it as
  mis-shaped, showing the parts' shapes, and never writes it."""

  def __init__(self, parts):
    self.shape = tuple(getattr(p, "shape", None) for p in parts)


def _stack(*xs, axis):
  if any(x is None for x in xs):
    return None
  if any(not isinstance(x, np.ndarray) for x in xs) or len({x.shape for x in xs}) > 1:
    return _Unstackable(xs)
  return np.stack(xs, axis=axis)


def _squeeze_leading(x, ndim):
  """Drops torch's leading singleton dims, e.g. position embeddings (1, N, D) -> (N, D)."""
  if x is None or x.ndim <= ndim or any(d != 1 for d in x.shape[:-ndim]):
    return x
  return x.reshape(x.shape[-ndim:])


def _block_targets(pool: TensorPool, out: str, *, q, k, v, o, norm1, norm2, mlp: dict,
                   qkv_bias: bool = True, ls1=None, ls2=None) -> dict:
  """Targets for one vit.TransformerBlock at module path `out` from checkpoint names: q/k/v/o
  and norm name prefixes, `mlp` {target path: source name or (fused name, chunk, chunks)}."""
  take = pool.take
  t = {
      f"{out}.norm1.scale": take(norm1 + ".weight"), f"{out}.norm1.bias": take(norm1 + ".bias"),
      f"{out}.norm2.scale": take(norm2 + ".weight"), f"{out}.norm2.bias": take(norm2 + ".bias"),
      f"{out}.attn.qkv.kernel": _stack(*(_t(take(n + ".weight")) for n in (q, k, v)), axis=1),
      f"{out}.attn.out.kernel": _t(take(o + ".weight")),
      f"{out}.attn.out.bias": take(o + ".bias"),
  }
  if qkv_bias:
    t[f"{out}.attn.qkv.bias"] = _stack(*(take(n + ".bias") for n in (q, k, v)), axis=0)
  if ls1 is not None:
    t[f"{out}.ls1.gamma"] = take(ls1)
    t[f"{out}.ls2.gamma"] = take(ls2)
  for target, source in mlp.items():
    if isinstance(source, tuple):  # (name, chunk index, number of chunks) of a fused tensor
      name, index, chunks = source
      x = take(name)
      t[target] = None if x is None else np.array_split(x, chunks, axis=0)[index]
      if target.endswith(".kernel") and t[target] is not None:
        t[target] = _t(t[target])
    else:
      x = take(source)
      t[target] = _t(x) if target.endswith(".kernel") else x
  # A fused tensor is taken once per chunk: keep the missing list free of duplicates.
  pool.missing[:] = list(dict.fromkeys(pool.missing))
  return t


def _dinov2_targets(pool: TensorPool, config: EncoderConfig, prefix: str) -> dict:
  p = prefix
  take = pool.take
  pool.ignore(lambda n: n == f"{p}embeddings.mask_token")  # only used for masked pretraining
  t = {
      "patch_embed.kernel": _conv(take(f"{p}embeddings.patch_embeddings.projection.weight")),
      "patch_embed.bias": take(f"{p}embeddings.patch_embeddings.projection.bias"),
      "pos_embed": _squeeze_leading(take(f"{p}embeddings.position_embeddings"), 2),
      "cls_token": _squeeze_leading(take(f"{p}embeddings.cls_token"), 1),
      "norm.scale": take(f"{p}layernorm.weight"),
      "norm.bias": take(f"{p}layernorm.bias"),
  }
  if config.num_register_tokens:
    t["register_tokens"] = _squeeze_leading(take(f"{p}embeddings.register_tokens"), 2)
  for i in range(config.depth):
    t.update(_dinov2_layer_targets(pool, config, f"{p}encoder.layer.{i}.", f"blocks.blocks.{i}"))
  return t


def _dinov2_layer_targets(pool: TensorPool, config: EncoderConfig, L: str, out: str) -> dict:
  """One Dinov2Layer (checkpoint prefix `L`) -> one TransformerBlock at module path `out`."""
  if config.mlp_type == "swiglu":
    if f"{L}mlp.weights_in.weight" in pool:
      mlp = {"mlp.gate.kernel": (f"{L}mlp.weights_in.weight", 0, 2),
             "mlp.up.kernel": (f"{L}mlp.weights_in.weight", 1, 2),
             "mlp.gate.bias": (f"{L}mlp.weights_in.bias", 0, 2),
             "mlp.up.bias": (f"{L}mlp.weights_in.bias", 1, 2)}
    else:
      mlp = {f"mlp.{a}.{kind}": f"{L}mlp.{b}_proj.{w}" for a, b in (("gate", "gate"),
                                                                     ("up", "up"))
             for kind, w in (("kernel", "weight"), ("bias", "bias"))}
    down = _first_present(pool, f"{L}mlp.weights_out.weight", f"{L}mlp.down_proj.weight")
    down = down.rsplit(".", 1)[0]
    mlp.update({"mlp.down.kernel": f"{down}.weight", "mlp.down.bias": f"{down}.bias"})
  else:
    mlp = {f"mlp.{fc}.{kind}": f"{L}mlp.{fc}.{w}" for fc in ("fc1", "fc2")
           for kind, w in (("kernel", "weight"), ("bias", "bias"))}
  attn = {name: _first_present(pool, f"{L}attention.attention.{legacy}.weight",
                               f"{L}attention.{new}.weight").rsplit(".", 1)[0]
          for name, legacy, new in (("q", "query", "q_proj"), ("k", "key", "k_proj"),
                                    ("v", "value", "v_proj"))}
  o = _first_present(pool, f"{L}attention.output.dense.weight",
                     f"{L}attention.o_proj.weight").rsplit(".", 1)[0]
  return _block_targets(pool, out, **attn, o=o, norm1=f"{L}norm1", norm2=f"{L}norm2",
                        qkv_bias=config.qkv_bias,
                        mlp={f"{out}.{k_}": v_ for k_, v_ in mlp.items()},
                        ls1=f"{L}layer_scale1.lambda1", ls2=f"{L}layer_scale2.lambda1")


def _siglip_targets(pool: TensorPool, config: EncoderConfig, prefix: str) -> dict:
  p = prefix
  take = pool.take
  # The attention-pooling head only feeds pooler_output, not last_hidden_state.
  pool.ignore(lambda n: n.startswith(f"{p}head."))
  t = {
      "patch_embed.kernel": _conv(take(f"{p}embeddings.patch_embedding.weight")),
      "patch_embed.bias": take(f"{p}embeddings.patch_embedding.bias"),
      "pos_embed": take(f"{p}embeddings.position_embedding.weight"),
      "norm.scale": take(f"{p}post_layernorm.weight"),
      "norm.bias": take(f"{p}post_layernorm.bias"),
  }
  for i in range(config.depth):
    t.update(_siglip_layer_targets(pool, config, f"{p}encoder.layers.{i}.", f"blocks.blocks.{i}"))
  return t


def _siglip_layer_targets(pool: TensorPool, config: EncoderConfig, L: str, out: str) -> dict:
  """One SiglipEncoderLayer (checkpoint prefix `L`) -> one TransformerBlock at `out`."""
  del config  # every SigLIP layer has the same layout
  mlp = {f"{out}.mlp.{fc}.{kind}": f"{L}mlp.{fc}.{w}" for fc in ("fc1", "fc2")
         for kind, w in (("kernel", "weight"), ("bias", "bias"))}
  return _block_targets(pool, out, q=f"{L}self_attn.q_proj", k=f"{L}self_attn.k_proj",
                        v=f"{L}self_attn.v_proj", o=f"{L}self_attn.out_proj",
                        norm1=f"{L}layer_norm1", norm2=f"{L}layer_norm2", mlp=mlp)


def layer_stack_targets(tensors: dict, config: EncoderConfig, depth: int, *, src: str, dst: str,
                        path: str = "checkpoint") -> tuple[dict, TensorPool]:
  """Maps `depth` transformers layers named `{src}{i}.` (Dinov2Layer for the dinov2 family,
  SiglipEncoderLayer for siglip) to TransformerBlocks at `{dst}.{i}` (unscanned)."""
  pool = TensorPool(tensors, source=path)
  layer = _dinov2_layer_targets if config.family == "dinov2" else _siglip_layer_targets
  targets = {}
  for i in range(depth):
    targets.update(layer(pool, config, f"{src}{i}.", f"{dst}.{i}"))
  return targets, pool


def _qwen2_targets(pool: TensorPool, config: TextEncoderConfig, prefix: str) -> dict:
  p = prefix
  take = pool.take
  pool.ignore(lambda n: n == "lm_head.weight")  # the LM head is not part of the text encoder
  t = {"embed.embedding": take(f"{p}embed_tokens.weight"), "norm.scale": take(f"{p}norm.weight")}
  for i in range(config.depth):
    L, out = f"{p}layers.{i}.", f"layers.{i}"
    t[f"{out}.input_norm.scale"] = take(f"{L}input_layernorm.weight")
    t[f"{out}.post_attn_norm.scale"] = take(f"{L}post_attention_layernorm.weight")
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
      t[f"{out}.{ours}.kernel"] = _t(take(f"{L}self_attn.{theirs}.weight"))
      t[f"{out}.{ours}.bias"] = take(f"{L}self_attn.{theirs}.bias")
    t[f"{out}.o.kernel"] = _t(take(f"{L}self_attn.o_proj.weight"))
    for ours in ("gate", "up", "down"):
      t[f"{out}.{ours}.kernel"] = _t(take(f"{L}mlp.{ours}_proj.weight"))
  return t


def _detect_prefix(pool: TensorPool, probe: str, prefixes: tuple[str, ...]) -> str:
  for prefix in prefixes:
    if prefix + probe in pool:
      return prefix
  return prefixes[0]  # nothing matches: every tensor will be reported missing under it


def _stack_layers(targets: dict, stack_prefix: str, depth: int) -> dict:
  """Unrolled per-layer targets `{stack_prefix}.{i}.x` -> scanned `{stack_prefix}.x` (L, ...)."""
  out, per_layer = {}, {}
  for name, value in targets.items():
    head = stack_prefix + "."
    if name.startswith(head) and name[len(head):].split(".", 1)[0].isdigit():
      index, rest = name[len(head):].split(".", 1)
      per_layer.setdefault(rest, {})[int(index)] = value
    else:
      out[name] = value
  for rest, layers in per_layer.items():
    out[f"{stack_prefix}.{rest}"] = _stack(*(layers.get(i) for i in range(depth)), axis=0)
  return out


def checkpoint_targets(tensors: dict, hf_config: dict, config, *, path: str = "checkpoint",
                       scan_layers: bool = False) -> tuple[dict, TensorPool]:
  """Maps checkpoint tensors to {module param path: array} for the given module config."""
  model_type = hf_config.get("model_type")
  pool = TensorPool(tensors, source=path)
  if model_type in ("dinov2", "dinov2_with_registers"):
    # A task model (e.g. ...ForImageClassification) nests the backbone under its prefix.
    prefix = _detect_prefix(pool, "embeddings.cls_token", ("", f"{model_type}.", "dinov2."))
    if prefix:
      pool.ignore(lambda n: n.startswith("classifier."))
    targets = _dinov2_targets(pool, config, prefix)
  elif model_type in ("siglip", "siglip_vision_model"):
    if model_type == "siglip":  # the text tower and contrastive logit params are not used
      pool.ignore(lambda n: n.startswith("text_model.") or n in ("logit_scale", "logit_bias"))
    prefix = _detect_prefix(pool, "embeddings.patch_embedding.weight",
                            ("vision_model.", "") if model_type == "siglip"
                            else ("", "vision_model."))
    targets = _siglip_targets(pool, config, prefix)
  elif model_type == "qwen2":
    prefix = _detect_prefix(pool, "embed_tokens.weight", ("model.", ""))
    targets = _qwen2_targets(pool, config, prefix)
  else:
    raise WeightLoadError(f"{path}: unsupported model_type {model_type!r}; supported: "
                          f"{', '.join(SUPPORTED_TYPES)}")
  if scan_layers:
    stack = "blocks.blocks" if isinstance(config, EncoderConfig) else "layers"
    targets = _stack_layers(targets, stack, config.depth)
  return targets, pool


def load(path: str, *, dtype: Any = jnp.float32, attention_impl: str = "xla",
         scan_layers: bool = False) -> nnx.Module:
  """A local transformers checkpoint directory -> VisionEncoder or TextEncoder (see module doc).

  dtype is the compute dtype (parameters stay float32); scan_layers stacks the layers for
  `nnx.scan`. Raises WeightLoadError for an unsupported model_type, unreadable or pickle
  weights, and any missing, unexpected or mis-shaped tensor.
  """
  if not os.path.isdir(path):
    raise WeightLoadError(f"{path}: not a checkpoint directory")
  hf_config = read_config(path)
  config = module_config(hf_config, path)
  tensors = read_safetensors(path)
  targets, pool = checkpoint_targets(tensors, hf_config, config, path=path,
                                     scan_layers=scan_layers)
  module = build_module(config, dtype=dtype, attention_impl=attention_impl,
                        scan_layers=scan_layers, abstract=True)
  assign(module, targets, pool, what=f"{hf_config['model_type']} checkpoint {path}")
  _to_device(module)
  return module


def _to_device(module: nnx.Module) -> None:
  """Replaces host numpy parameter values by jax arrays."""
  for _, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    variable.set_value(jnp.asarray(variable.get_value()))
