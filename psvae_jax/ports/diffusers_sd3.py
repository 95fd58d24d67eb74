"""diffusers `SD3Transformer2DModel` -> `psvae_jax.models.mmdit.MMDiT`.

`load_sd3(path, config, tensors, dtype=...)` builds the MMDiT for the diffusers config and fills
it strictly (every tensor used, every parameter set, shapes checked). The returned module obeys
docs/method.md#stable-interfaces: `module(hidden_states, encoder_hidden_states,
pooled_projections, timestep)` with NHWC latents and diffusers' timestep convention (t * 1000)
returns diffusers' `.sample` in NHWC.

Supported config options: patch_size, sample_size, pos_embed_max_size (also None), qk_norm
(None or 'rms_norm'), dual_attention_layers (SD3.5), caption_projection_dim (must equal
num_attention_heads * attention_head_dim, as diffusers' blocks require), pooled_projection_dim,
joint_attention_dim, out_channels.

Name mapping (diffusers -> MMDiT, Linear weights transposed, q/k/v stacked on axis 1):
  pos_embed.proj                       patch_embed (conv (D, C, p, p) -> (p, p, C, D))
  pos_embed.pos_embed                  checked against the model's fixed sincos table, not stored
  time_text_embed.timestep_embedder.linear_{1,2}   time_fc{1,2}
  time_text_embed.text_embedder.linear_{1,2}       pooled_fc{1,2}
  context_embedder                     context_embedder
  transformer_blocks.<i> (i < N-1)     blocks.<i>; the last one -> last_block
    norm1.linear / norm1_context.linear          img_modulation.linear / txt_modulation.linear
    attn.to_{q,k,v} / attn.add_{q,k,v}_proj      img_qkv / txt_qkv
    attn.norm_{q,k} / attn.norm_added_{q,k}      img_{q,k}_norm / txt_{q,k}_norm
    attn.to_out.0 / attn.to_add_out              img_out / txt_out
    ff.net.0.proj, ff.net.2 (and ff_context)     img_mlp.fc1, fc2 (txt_mlp)
    attn2.*                                      attn2_*  (dual-attention blocks)
  norm_out.linear, proj_out            norm_out.linear, proj_out
The last block's `attn.add_q_proj` and `attn.norm_added_q` are dropped on purpose: its text
queries only produce the text output that SD3 discards.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.models.mmdit import MMDiT, MMDiTConfig, sincos_pos_embed_2d, to_scanned_params
from psvae_jax.ports.common import TensorPool, WeightLoadError, assign

Dtype = Any

_KNOWN_KEYS = {
    "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
    "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
    "pooled_projection_dim", "out_channels", "pos_embed_max_size", "dual_attention_layers",
    "qk_norm"}
# SD3Transformer2DModel.__init__ defaults, for keys a config.json may omit.
_DEFAULTS = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=18,
                 attention_head_dim=64, num_attention_heads=18, joint_attention_dim=4096,
                 caption_projection_dim=1152, pooled_projection_dim=2048, out_channels=16,
                 pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None)


def sd3_mmdit_config(config: dict, *, path: str = "config") -> MMDiTConfig:
  """The MMDiTConfig equivalent to a diffusers SD3Transformer2DModel config."""
  unknown = sorted(k for k in config if not k.startswith("_") and k not in _KNOWN_KEYS)
  if unknown:
    raise WeightLoadError(f"{path}: SD3Transformer2DModel config keys not supported by this "
                          f"port: {unknown}")
  get = lambda key: config.get(key, _DEFAULTS[key])
  qk_norm = get("qk_norm")
  if qk_norm not in (None, "rms_norm"):
    raise WeightLoadError(f"{path}: qk_norm={qk_norm!r} is not supported (None or 'rms_norm')")
  heads, head_dim = int(get("num_attention_heads")), int(get("attention_head_dim"))
  caption_dim = int(get("caption_projection_dim"))
  if caption_dim != heads * head_dim:
    raise WeightLoadError(
        f"{path}: caption_projection_dim={caption_dim} differs from the model width "
        f"{heads * head_dim} (num_attention_heads * attention_head_dim); SD3's joint blocks "
        "need them equal")
  num_layers = int(get("num_layers"))
  dual = tuple(int(i) for i in (get("dual_attention_layers") or ()))
  if any(not 0 <= i < num_layers for i in dual):
    raise WeightLoadError(f"{path}: dual_attention_layers {dual} outside 0..{num_layers - 1}")
  max_size = get("pos_embed_max_size")
  out_channels = get("out_channels")
  return MMDiTConfig(
      num_layers=num_layers, num_heads=heads, head_dim=head_dim,
      in_channels=int(get("in_channels")),
      out_channels=None if out_channels is None else int(out_channels),
      patch_size=int(get("patch_size")), sample_size=int(get("sample_size")),
      pos_embed_max_size=None if max_size is None else int(max_size), pos_embed="sincos",
      mlp_ratio=4.0, text_dim=int(get("joint_attention_dim")),
      pooled_dim=int(get("pooled_projection_dim")), qk_norm=qk_norm,
      dual_attention_layers=dual, causal_text=False, edit=False, ddt_head=None)


def _linear(pool: TensorPool, prefix: str, target: str, out: dict) -> None:
  w, b = pool.take(f"{prefix}.weight"), pool.take(f"{prefix}.bias")
  out[f"{target}.kernel"] = None if w is None else w.T
  out[f"{target}.bias"] = b


def _stacked(pool: TensorPool, prefixes: list[str], target: str, out: dict) -> None:
  ws = [pool.take(f"{p}.weight") for p in prefixes]
  bs = [pool.take(f"{p}.bias") for p in prefixes]
  out[f"{target}.kernel"] = None if any(w is None for w in ws) else np.stack(
      [w.T for w in ws], axis=1)
  out[f"{target}.bias"] = None if any(b is None for b in bs) else np.stack(bs, axis=0)


def _norm(pool: TensorPool, name: str, target: str, out: dict) -> None:
  out[f"{target}.scale"] = pool.take(f"{name}.weight")


def _block_targets(pool: TensorPool, src: str, dst: str, *, last: bool, dual: bool,
                   qk_norm: bool, out: dict) -> None:
  a = f"{src}.attn"
  _linear(pool, f"{src}.norm1.linear", f"{dst}.img_modulation.linear", out)
  _linear(pool, f"{src}.norm1_context.linear", f"{dst}.txt_modulation.linear", out)
  _stacked(pool, [f"{a}.to_q", f"{a}.to_k", f"{a}.to_v"], f"{dst}.img_qkv", out)
  txt_parts = ["add_k_proj", "add_v_proj"] if last else ["add_q_proj", "add_k_proj", "add_v_proj"]
  _stacked(pool, [f"{a}.{p}" for p in txt_parts], f"{dst}.txt_qkv", out)
  if qk_norm:
    _norm(pool, f"{a}.norm_q", f"{dst}.img_q_norm", out)
    _norm(pool, f"{a}.norm_k", f"{dst}.img_k_norm", out)
    _norm(pool, f"{a}.norm_added_k", f"{dst}.txt_k_norm", out)
    if not last:
      _norm(pool, f"{a}.norm_added_q", f"{dst}.txt_q_norm", out)
  _linear(pool, f"{a}.to_out.0", f"{dst}.img_out", out)
  _linear(pool, f"{src}.ff.net.0.proj", f"{dst}.img_mlp.fc1", out)
  _linear(pool, f"{src}.ff.net.2", f"{dst}.img_mlp.fc2", out)
  if not last:
    _linear(pool, f"{a}.to_add_out", f"{dst}.txt_out", out)
    _linear(pool, f"{src}.ff_context.net.0.proj", f"{dst}.txt_mlp.fc1", out)
    _linear(pool, f"{src}.ff_context.net.2", f"{dst}.txt_mlp.fc2", out)
  if dual:
    a2 = f"{src}.attn2"
    _stacked(pool, [f"{a2}.to_q", f"{a2}.to_k", f"{a2}.to_v"], f"{dst}.attn2_qkv", out)
    if qk_norm:
      _norm(pool, f"{a2}.norm_q", f"{dst}.attn2_q_norm", out)
      _norm(pool, f"{a2}.norm_k", f"{dst}.attn2_k_norm", out)
    _linear(pool, f"{a2}.to_out.0", f"{dst}.attn2_out", out)


def _check_pos_table(pool: TensorPool, cfg: MMDiTConfig, path: str) -> None:
  """The checkpoint's stored sincos buffer must be the table the model computes."""
  if "pos_embed.pos_embed" not in pool:
    if cfg.pos_embed_max_size is not None:
      pool.take("pos_embed.pos_embed")  # recorded as missing
    return
  stored = pool.take("pos_embed.pos_embed")
  side = cfg.pos_embed_max_size or cfg.base_grid
  table = sincos_pos_embed_2d(cfg.width, side, side, cfg.base_grid)
  stored = np.asarray(stored, np.float32).reshape(-1, cfg.width)
  if stored.shape != table.shape or not np.allclose(stored, table, atol=1e-5):
    raise WeightLoadError(f"{path}: pos_embed.pos_embed differs from SD3's fixed sincos table "
                          f"for pos_embed_max_size={cfg.pos_embed_max_size}, "
                          f"sample_size={cfg.sample_size}; custom position tables are not "
                          "supported")


def sd3_targets(tensors: dict[str, np.ndarray], cfg: MMDiTConfig, *, path: str = "checkpoint",
                scan_layers: bool = False) -> tuple[dict, TensorPool]:
  """Maps SD3Transformer2DModel tensors to {MMDiT param path: array} (the map above)."""
  pool = TensorPool(tensors, source=path)
  targets: dict[str, np.ndarray | None] = {}
  w = pool.take("pos_embed.proj.weight")
  targets["patch_embed.kernel"] = None if w is None else w.transpose(2, 3, 1, 0)
  targets["patch_embed.bias"] = pool.take("pos_embed.proj.bias")
  _check_pos_table(pool, cfg, path)
  _linear(pool, "time_text_embed.timestep_embedder.linear_1", "time_fc1", targets)
  _linear(pool, "time_text_embed.timestep_embedder.linear_2", "time_fc2", targets)
  _linear(pool, "time_text_embed.text_embedder.linear_1", "pooled_fc1", targets)
  _linear(pool, "time_text_embed.text_embedder.linear_2", "pooled_fc2", targets)
  _linear(pool, "context_embedder", "context_embedder", targets)
  qk = cfg.qk_norm is not None
  last = cfg.num_layers - 1
  for i in range(cfg.num_layers):
    _block_targets(pool, f"transformer_blocks.{i}", "last_block" if i == last else f"blocks.{i}",
                   last=i == last, dual=i in cfg.dual_attention_layers, qk_norm=qk, out=targets)
  # Text queries of the context-pre-only block feed only the discarded text output.
  pool.ignore(lambda n: n.startswith((f"transformer_blocks.{last}.attn.add_q_proj.",
                                      f"transformer_blocks.{last}.attn.norm_added_q.")))
  _linear(pool, "norm_out.linear", "norm_out.linear", targets)
  _linear(pool, "proj_out", "proj_out", targets)
  if scan_layers:
    targets = to_scanned_params(targets, cfg)
  return targets, pool


def load_sd3(path: str, config: dict, tensors: dict[str, np.ndarray], *,
             dtype: Dtype = jnp.float32, scan_layers: bool = False,
             attention_impl: str = "xla") -> MMDiT:
  """An MMDiT with the weights of a diffusers SD3Transformer2DModel (float32 parameters,
  `dtype` compute)."""
  cfg = sd3_mmdit_config(config, path=path)
  # Abstract construction: every parameter is overwritten, so none is initialised.
  model = nnx.eval_shape(lambda: MMDiT(cfg, scan_layers=scan_layers,
                                       attention_impl=attention_impl, dtype=dtype,
                                       param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  targets, pool = sd3_targets(tensors, cfg, path=path, scan_layers=scan_layers)
  assign(model, targets, pool, what=f"SD3Transformer2DModel from {path}")
  return model
