"""Shared Vision Transformer pieces: pre-norm block, block stack (optionally scanned), patch
embedding and position-embedding interpolation.

Parameter layout (logical axis names in brackets):
  TransformerBlock
    norm1.{scale,bias}            [norm]
    attn.qkv.kernel (dim, 3, heads*head_dim)  [embed, None, heads]   fused q/k/v projection
    attn.qkv.bias   (3, heads*head_dim)       [None, heads]
    attn.out.{kernel,bias}        [heads, embed] / [embed]
    ls1.gamma, ls2.gamma          [norm]       only with layer_scale_init
    norm2.{scale,bias}            [norm]
    mlp.fc1 / mlp.fc2             gelu / gelu_tanh: [embed, mlp] / [mlp, embed]
    mlp.gate / mlp.up / mlp.down  swiglu
  TransformerStack
    blocks.<i>.<block params>     unscanned
    blocks.<block params>         scanned: every leaf gains a leading layer axis [layers]
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax.models import dense
from psvae_jax.models import remat as remat_lib
from psvae_jax.models.grad_barrier import materialize_grad
from psvae_jax.models.attention import dot_product_attention, unstack
from psvae_jax.models.resize import resize_bicubic
from psvae_jax.sharding import constrain

MLP_TYPES = ("gelu", "gelu_tanh", "swiglu")
Dtype = Any


def _init(names, init=None):
  return nnx.with_partitioning(init or nnx.initializers.lecun_normal(), names)


def _norm(dim, eps, dtype, param_dtype, rngs):
  return nnx.LayerNorm(
      dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,  # two-pass variance, as torch: robust to large activations
      scale_init=_init(("norm",), nnx.initializers.ones),
      bias_init=_init(("norm",), nnx.initializers.zeros), rngs=rngs)


def _linear(d_in, d_out, names, *, use_bias=True, dtype, param_dtype, rngs):
  return dense.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=_init(names),
                      bias_init=_init((names[1],), nnx.initializers.zeros), rngs=rngs)


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0) -> int:
  """DINOv2's SwiGLU width: two thirds of dim*mlp_ratio, rounded up to a multiple of 8."""
  hidden = int(dim * mlp_ratio)
  return (int(hidden * 2 / 3) + 7) // 8 * 8


def gelu_erf(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x) (torch nn.GELU()). Written out: on XLA:CPU this form runs ~3x
  faster than jax.nn.gelu(approximate=False), with the same values to float rounding."""
  return x * 0.5 * (1.0 + jax.lax.erf(x * np.float32(1 / np.sqrt(2))).astype(x.dtype))


class FusedQKV(nnx.Module):
  """q, k and v projections as one (dim, 3, heads*head_dim) matmul."""

  def __init__(self, dim: int, inner_dim: int, *, use_bias: bool = True, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    self.kernel = nnx.Param(init(rngs.params(), (dim, 3, inner_dim), param_dtype),
                            out_sharding=("embed", None, "heads"))
    self.bias = (nnx.Param(jnp.zeros((3, inner_dim), param_dtype), out_sharding=(None, "heads"))
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., dim) -> (..., 3, heads*head_dim)."""
    y = dense.project(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection."""

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True,
               attention_impl: str = "xla", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.attention_impl = attention_impl
    self.qkv = FusedQKV(dim, dim, use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs)
    self.out = _linear(dim, dim, ("heads", "embed"), dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    batch, seq, _ = x.shape
    qkv = self.qkv(x).reshape(batch, seq, 3, self.num_heads, self.head_dim)
    y = dot_product_attention(*unstack(qkv, 2), mask=mask, impl=self.attention_impl)
    return self.out(y.reshape(batch, seq, self.num_heads * self.head_dim))


class Mlp(nnx.Module):
  """Two-layer MLP (gelu / gelu_tanh) or gated SwiGLU; `mlp_dim` is the hidden width."""

  def __init__(self, dim: int, mlp_dim: int, *, mlp_type: str = "gelu",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if mlp_type not in MLP_TYPES:
      raise ValueError(f"unknown mlp_type {mlp_type!r}; expected one of {MLP_TYPES}")
    self.mlp_type = mlp_type
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if mlp_type == "swiglu":
      self.gate = _linear(dim, mlp_dim, ("embed", "mlp"), **kw)
      self.up = _linear(dim, mlp_dim, ("embed", "mlp"), **kw)
      self.down = _linear(mlp_dim, dim, ("mlp", "embed"), **kw)
    else:
      self.fc1 = _linear(dim, mlp_dim, ("embed", "mlp"), **kw)
      self.fc2 = _linear(mlp_dim, dim, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.mlp_type == "swiglu":
      return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
    h = self.fc1(x)
    if self.mlp_type == "gelu_tanh":  # gelu_pytorch_tanh
      return self.fc2(jax.nn.gelu(h, approximate=True))
    return self.fc2(gelu_erf(h))


class LayerScale(nnx.Module):
  """Per-channel residual branch scale (DINOv2's `lambda1`)."""

  def __init__(self, dim: int, init_value: float, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.dtype = dtype
    self.gamma = nnx.Param(jnp.full((dim,), init_value, param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...].astype(self.dtype)


class TransformerBlock(nnx.Module):
  """Pre-norm ViT block: x + ls1*attn(norm1(x)), then x + ls2*mlp(norm2(x)).

  `mlp_dim` is the MLP's hidden width as stored in the weights (for DINOv2's SwiGLU use
  `swiglu_hidden_dim`). `layer_scale_init=None` means no layer scale (SigLIP).
  """

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, *,
               layer_scale_init: float | None = None, mlp_type: str = "gelu",
               norm_eps: float = 1e-6, qkv_bias: bool = True, attention_impl: str = "xla",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.norm1 = _norm(dim, norm_eps, dtype, param_dtype, rngs)
    self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attention_impl=attention_impl,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = _norm(dim, norm_eps, dtype, param_dtype, rngs)
    self.mlp = Mlp(dim, mlp_dim, mlp_type=mlp_type, dtype=dtype, param_dtype=param_dtype,
                   rngs=rngs)
    if layer_scale_init is None:
      self.ls1 = self.ls2 = None
    else:
      self.ls1 = LayerScale(dim, layer_scale_init, dtype=dtype, param_dtype=param_dtype)
      self.ls2 = LayerScale(dim, layer_scale_init, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = x.astype(self.dtype)
    h = self.attn(self.norm1(x), mask)
    x = x + (self.ls1(h) if self.ls1 is not None else h)
    h = self.mlp(self.norm2(x))
    x = x + (self.ls2(h) if self.ls2 is not None else h)
    return constrain(x, ("batch", "seq", "act_embed"))


def stacked_layers(make, num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """`make(rngs)` built `num_layers` times as one module whose parameters are stacked on a
  leading 'layers' axis (the layout `apply_layers(..., scanned=True)` runs)."""
  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make_stacked(r):
    return make(r)
  return make_stacked(rngs)


class TransformerStack(nnx.Module):
  """`num_layers` TransformerBlocks applied in sequence.

  scan_layers=True stores the blocks' parameters stacked on a leading 'layers' axis (created
  with `nnx.vmap`) and runs them with a scan (one compiled block: fast compiles for deep
  models); remat (True = 'full', or a policy name from `psvae_jax.models.remat`) recomputes
  each block's activations in the backward pass. Both give the same outputs as the default
  unrolled list.
  """

  def __init__(self, num_layers: int, dim: int, num_heads: int, mlp_dim: int, *,
               scan_layers: bool = False, remat: bool | str = False, rngs: nnx.Rngs,
               **block_kwargs):
    self.num_layers = num_layers
    self.scan_layers = scan_layers
    self.remat = remat_lib.policy_name(remat)
    make = lambda r: TransformerBlock(dim, num_heads, mlp_dim, rngs=r, **block_kwargs)
    if scan_layers:
      self.blocks = stacked_layers(make, num_layers, rngs)
    else:
      self.blocks = nnx.List([make(rngs) for _ in range(num_layers)])

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    return apply_layers(self.blocks, x, lambda block, h: block(h, mask),
                        scanned=self.scan_layers, remat=self.remat)


def apply_layers(layers, x: jax.Array, call, *, scanned: bool, remat: bool | str) -> jax.Array:
  """Runs `h = call(layer, h)` over a stack of NNX layers.

  The layers are split into (graphdef, state) and re-merged inside plain `jax.lax.scan` /
  `jax.checkpoint`, so the stack also runs inside transforms whose trace differs from the one
  the parameters live in (e.g. a jitted loss differentiated only w.r.t. its inputs).
  scanned: `layers` is one module whose parameters have a leading layer axis; otherwise an
  iterable of modules. remat: a bool or policy name (`psvae_jax.models.remat`).
  """
  def step(graphdef, state, h):
    return call(nnx.merge(graphdef, state), h)

  if scanned:
    graphdef, state = nnx.split(layers)
    body = remat_lib.checkpoint(lambda state, h: step(graphdef, state, h), remat)
    return jax.lax.scan(lambda h, s: (body(s, h), None), x, state)[0]
  remat = remat_lib.policy_name(remat)
  for layer in layers:
    x = materialize_grad(x)  # see psvae_jax.models.grad_barrier
    if remat:
      graphdef, state = nnx.split(layer)
      x = remat_lib.checkpoint(lambda s, h, g=graphdef: step(g, s, h), remat)(state, x)
    else:
      x = call(layer, x)
  return x


class PatchEmbed(nnx.Module):
  """Non-overlapping patches (a stride=patch conv) -> (batch, grid_h, grid_w, dim). NHWC input."""

  def __init__(self, patch_size: int, in_channels: int, dim: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.dtype = dtype
    self.kernel = nnx.Param(
        nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)(
            rngs.params(), (patch_size, patch_size, in_channels, dim), param_dtype),
        out_sharding=(None, None, None, "conv_out"))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("conv_out",))

  def __call__(self, pixels: jax.Array) -> jax.Array:
    batch, height, width, channels = pixels.shape
    p = self.patch_size
    gh, gw = height // p, width // p
    # Like torch's stride-p conv, trailing rows/cols that do not fill a patch are dropped.
    x = pixels[:, :gh * p, :gw * p].astype(self.dtype)
    x = x.reshape(batch, gh, p, gw, p, channels).transpose(0, 1, 3, 2, 4, 5)
    # As one 2-D matmul over the flattened (p, p, c) patches: the same result as the conv. The
    # einsum form's weight gradient made XLA:CPU write the transposed (width, tokens) gradient
    # of the whole residual stream inside one loop fusion (18% of an MMDiT training step).
    x = x.reshape(batch, gh, gw, p * p * channels)
    kernel = self.kernel[...].astype(self.dtype)
    return dense.project(x, kernel.reshape(-1, kernel.shape[-1])) + \
        self.bias[...].astype(self.dtype)


def interpolate_pos_grid(pos: jax.Array, grid: tuple[int, int], *,
                         antialias: bool = False) -> jax.Array:
  """Resizes square-grid position embeddings (n*n, dim) to `grid` = (h, w) -> (h*w, dim).

  Bicubic in float32 exactly as torch (see `resize.resize_bicubic`); the identity when the grid
  already matches.
  """
  n = int(round(pos.shape[0] ** 0.5))
  if n * n != pos.shape[0]:
    raise ValueError(f"position embeddings with {pos.shape[0]} entries are not a square grid")
  if tuple(grid) == (n, n):
    return pos
  dtype = pos.dtype
  resized = resize_bicubic(pos.reshape(n, n, -1).astype(jnp.float32), grid, antialias=antialias)
  return resized.reshape(grid[0] * grid[1], -1).astype(dtype)
