"""Analytic FLOP counts per network, the one home of the formulas behind throughput and MFU.

Conventions: a matmul of (m, k) by (k, n) costs 2 m k n FLOPs; only matmuls (including the two
attention matmuls) and convolutions are counted, elementwise work is not. A training step costs
3x the forward pass (backward = 2x forward: gradients with respect to activations and to
weights). For convolutions only kernel taps that land inside the input count, as in XLA's cost
analysis (taps on the zero padding multiply zeros): for a 3x3 'same' conv this is
(1 - 2/(3n))**2 of the nominal 2*H*W*9*C_in*C_out on an n x n map, 0.7% below it at 256 px,
31% below it on a 4 x 4 map. Tasks compose these per stage (`tasks.autoencoder_parts`,
`tasks.t2i`).
"""
from __future__ import annotations

from typing import Sequence

from psvae_jax.models import lpips as lpips_lib
from psvae_jax.models import text_encoder as text_encoder_lib
from psvae_jax.models.mmdit import MMDiTConfig

# ---- transformers -------------------------------------------------------------------------

def vit_forward_flops(width: int, depth: int, mlp_dim: int, tokens: int, *,
                      gated: bool = False) -> float:
  """Matmul FLOPs of `depth` pre-norm transformer blocks on `tokens` tokens (one example)."""
  mlp_mats = 3 if gated else 2
  per_layer = 2 * tokens * (4 * width * width + mlp_mats * width * mlp_dim)
  per_layer += 2 * 2 * tokens * tokens * width  # q k^T and attn v
  return float(depth * per_layer)


def text_encoder_forward_flops(c: text_encoder_lib.TextEncoderConfig, tokens: int) -> float:
  """Matmul FLOPs of the Qwen2 text encoder's forward on `tokens` tokens (one example)."""
  q = c.num_heads * c.head_dim
  kv = c.num_kv_heads * c.head_dim
  per_layer = 2 * tokens * (c.width * (q + 2 * kv) + q * c.width + 3 * c.width * c.mlp_dim)
  per_layer += 2 * 2 * tokens * tokens * q
  return float(c.depth * per_layer)


def resize_flops(in_hw: tuple[int, int], out_hw: tuple[int, int], channels: int) -> float:
  """The separable bicubic resize (`models.resize.resize_bicubic`, height first) of one image."""
  (hi, wi), (ho, wo) = in_hw, out_hw
  flops = 2 * ho * hi * wi * channels if hi != ho else 0
  flops += 2 * wo * wi * ho * channels if wi != wo else 0
  return float(flops)


# ---- MMDiT ---------------------------------------------------------------------------------


def _mmdit_block_flops(width: int, mlp: int, text_len: int, image_len: int, *,
                       context_pre_only: bool, dual: bool) -> int:
  """Forward FLOPs of one joint block for one example, excluding the adaLN modulations."""
  d = width
  length = text_len + image_len
  img = 2 * image_len * d * (3 * d + d + 2 * mlp)  # qkv, out, mlp
  if context_pre_only:
    txt = 2 * text_len * d * 2 * d  # keys and values only
    attn = 4 * image_len * length * d  # image queries over all keys: scores + weighted sum
  else:
    txt = 2 * text_len * d * (3 * d + d + 2 * mlp)
    attn = 4 * length * length * d
  flops = img + txt + attn
  if dual:
    flops += 2 * image_len * d * 4 * d + 4 * image_len * image_len * d
  return flops


def mmdit_forward_flops(config: MMDiTConfig, batch: int, text_len: int, *,
                        image_tokens: int | None = None, source_tokens: int = 0) -> int:
  """Forward matmul FLOPs of `MMDiT(config)` for `batch` examples.

  image_tokens: target tokens per example (default: the `sample_size` latent at
  `patch_size`); source_tokens: extra source-image tokens per example (editing).
  """
  c = config
  d = c.width
  n = image_tokens if image_tokens is not None else (c.sample_size // c.patch_size) ** 2
  image_len = n + source_tokens
  patch_in = c.patch_size ** 2 * c.in_channels
  patch_out = c.patch_size ** 2 * c.out_dim
  flops = 2 * image_len * patch_in * d  # patch embedding (target and source)
  flops += 2 * text_len * c.text_dim * d  # context embedder
  flops += 2 * (c.timestep_embed_dim * d + d * d) + 2 * (c.pooled_dim * d + d * d)
  for i in range(c.num_layers):
    last = i == c.num_layers - 1
    dual = i in c.dual_attention_layers
    flops += _mmdit_block_flops(d, c.mlp_dim, text_len, image_len, context_pre_only=last,
                                dual=dual)
    img_chunks = 9 if dual else 6
    txt_chunks = 2 if last else 6
    flops += 2 * d * d * (img_chunks + txt_chunks)  # per-example adaLN modulations
  if c.ddt_head is None:
    flops += 2 * d * 2 * d + 2 * n * d * patch_out  # norm_out modulation, proj_out
  else:
    h = c.ddt_head
    w = h.width
    flops += 2 * n * (d * w + patch_in * w)  # condition projection, noisy-input embedding
    per_block = 2 * n * w * (6 * w + 3 * w + w + 3 * h.mlp_dim) + 4 * n * n * w
    flops += h.depth * per_block
    flops += 2 * n * w * (2 * w + patch_out)  # final modulation (per token), final linear
  return batch * flops


def mmdit_train_flops(config: MMDiTConfig, batch: int, text_len: int, *,
                      image_tokens: int | None = None, source_tokens: int = 0) -> int:
  """FLOPs of one training step (forward + backward = 3x forward) of `MMDiT(config)`."""
  return 3 * mmdit_forward_flops(config, batch, text_len, image_tokens=image_tokens,
                                 source_tokens=source_tokens)


# ---- convolutional networks ----------------------------------------------------------------


def conv_taps(size: int, kernel: int, stride: int = 1, pad: int | None = None) -> tuple[int, int]:
  """(output size, kernel taps inside the input summed over output positions) along one axis.

  pad defaults to kernel // 2 (the 'same' padding of the stride-1 convs here).
  """
  pad = kernel // 2 if pad is None else pad
  out = (size + 2 * pad - kernel) // stride + 1
  if out < 1:
    raise ValueError(f"a {kernel}-tap conv with stride {stride} and padding {pad} has no output "
                     f"on a size-{size} axis")
  taps = sum(max(min(o * stride - pad + kernel, size) - max(o * stride - pad, 0), 0)
             for o in range(out))
  return out, taps


def conv2d_flops(height: int, width: int, in_ch: int, out_ch: int, kernel: int, *,
                 stride: int = 1, pad: int | None = None) -> tuple[int, int, int]:
  """(FLOPs, out height, out width) of one 2-D conv on one (height, width, in_ch) map."""
  out_h, taps_h = conv_taps(height, kernel, stride, pad)
  out_w, taps_w = conv_taps(width, kernel, stride, pad)
  return 2 * taps_h * taps_w * in_ch * out_ch, out_h, out_w


def _resnet_flops(h: int, w: int, in_ch: int, out_ch: int) -> int:
  flops = conv2d_flops(h, w, in_ch, out_ch, 3)[0] + conv2d_flops(h, w, out_ch, out_ch, 3)[0]
  if in_ch != out_ch:
    flops += conv2d_flops(h, w, in_ch, out_ch, 1)[0]
  return flops


def _spatial_attention_flops(h: int, w: int, channels: int) -> int:
  n = h * w
  return 2 * n * channels * channels * 4 + 4 * n * n * channels  # q, k, v, out; scores, sum


def pixel_decoder_forward_flops(latent_hw: tuple[int, int], *, z_channels: int, out_ch: int = 3,
                                ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                                attn_resolutions: Sequence[int], resolution: int,
                                use_post_quant_conv: bool = False,
                                mid_attention: bool = True) -> tuple[int, int]:
  """(FLOPs before `conv_out`, FLOPs of `conv_out`) of `PixelDecoder` on one latent.

  The two parts are returned apart because the adaptive GAN weight differentiates the last
  layer alone. Arguments are PixelDecoder's.
  """
  levels = len(ch_mult)
  h, w = latent_hw
  block_in = ch * ch_mult[-1]
  flops = conv2d_flops(h, w, z_channels, z_channels, 1)[0] if use_post_quant_conv else 0
  flops += conv2d_flops(h, w, z_channels, block_in, 3)[0]
  flops += 2 * _resnet_flops(h, w, block_in, block_in)
  if mid_attention:
    flops += _spatial_attention_flops(h, w, block_in)
  for i in range(levels):
    level = levels - 1 - i
    block_out = ch * ch_mult[level]
    attention = resolution // 2 ** level in attn_resolutions
    for j in range(num_res_blocks + 1):
      flops += _resnet_flops(h, w, block_in if j == 0 else block_out, block_out)
      if attention:
        flops += _spatial_attention_flops(h, w, block_out)
    block_in = block_out
    if level != 0:
      h, w = 2 * h, 2 * w
      flops += conv2d_flops(h, w, block_in, block_in, 3)[0]
  return flops, conv2d_flops(h, w, block_in, out_ch, 3)[0]


def pixel_decoder_config_flops(pixel_decoder_config, latent_hw: tuple[int, int], *,
                               z_channels: int) -> tuple[int, int]:
  """`pixel_decoder_forward_flops` for a `config.model.pixel_decoder` section."""
  p = pixel_decoder_config
  return pixel_decoder_forward_flops(latent_hw, z_channels=z_channels, ch=p.ch,
                                     ch_mult=tuple(p.ch_mult), num_res_blocks=p.num_res_blocks,
                                     attn_resolutions=tuple(p.attn_resolutions),
                                     resolution=p.resolution)


def vgg16_forward_flops(height: int, width: int) -> int:
  """The 13 convs of LPIPS' VGG16 trunk on one (height, width, 3) image."""
  flops, in_ch, h, w = 0, 3, height, width
  for b, block in enumerate(lpips_lib.VGG16_BLOCKS):
    if b > 0:
      h, w = h // 2, w // 2  # 2x2 max-pool, stride 2 (floor)
    for out_ch in block:
      flops += conv2d_flops(h, w, in_ch, out_ch, 3)[0]
      in_ch = out_ch
  return flops


def lpips_forward_flops(height: int, width: int) -> int:
  """`LPIPS()(x, y)` for one image pair: the VGG16 trunk on both images and the 1x1 heads."""
  heads, h, w = 0, height, width
  for b, channels in enumerate(lpips_lib.TAP_CHANNELS):
    if b > 0:
      h, w = h // 2, w // 2
    heads += 2 * h * w * channels
  return 2 * vgg16_forward_flops(height, width) + heads


def patchgan_forward_flops(height: int, width: int, *, in_ch: int = 3, ndf: int = 64,
                           n_layers: int = 3) -> int:
  """`NLayerDiscriminator(in_ch, ndf, n_layers)` on one (height, width) image: 4x4 convs with
  padding 1, stride 2 except the last two."""
  widths = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]
  layers = [(in_ch, widths[0], 2)]
  layers += [(widths[n - 1], widths[n], 2 if n < n_layers else 1) for n in range(1, n_layers + 1)]
  layers.append((widths[-1], 1, 1))
  flops, h, w = 0, height, width
  for cin, cout, stride in layers:
    f, h, w = conv2d_flops(h, w, cin, cout, 4, stride=stride, pad=1)
    flops += f
  return flops
