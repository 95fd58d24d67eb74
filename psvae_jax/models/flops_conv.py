"""Analytic forward FLOPs of the convolutional networks in the autoencoder step: the LDM pixel
decoder, LPIPS-VGG16 and the PatchGAN discriminator (one example each).

Conventions as in `psvae_jax.models.flops` (2 FLOPs per multiply-add, matmuls and convolutions
only, elementwise work not counted), plus, for convolutions: only kernel taps that land inside
the input count, as in XLA's cost analysis (taps on the zero padding multiply zeros). For a
3x3 'same' conv this is (1 - 2/(3n))**2 of the nominal 2*H*W*9*C_in*C_out on an n x n map: 0.7%
below it at 256 px, 31% below it on a 4 x 4 map.
"""
from __future__ import annotations

from typing import Sequence

from psvae_jax.models import lpips as lpips_lib


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
