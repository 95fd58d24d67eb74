"""Robust image and text decoding: every failure becomes a BadImage with a reason, never a crash.

Handled: empty files, non-image bytes, truncated or corrupt files, decompression bombs (refused
from the header size, before any pixel is decoded), too-small images, and every PIL mode
(grayscale, palette, 16-bit, float, CMYK, alpha -> composited on white) converted to 8-bit RGB.
"""
import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps

from psvae_jax.data.errors import BadImage

# Exceptions PIL decoders raise on broken input (PNG chunk errors surface as SyntaxError,
# truncation as OSError, bad headers as ValueError/struct.error/EOFError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                 IndexError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = 255


def load_rgb(data: bytes, *, max_pixels: int, min_size: int = 1,
             draft_short_side: int | None = None) -> Image.Image:
  """Decodes encoded image bytes to an 8-bit RGB PIL image (EXIF orientation applied).

  Args:
    data: the encoded file (JPEG, PNG, WebP, BMP, ... anything PIL reads).
    max_pixels: images whose header claims more pixels are refused before decoding.
    min_size: images whose shorter side is below this are refused as too small.
    draft_short_side: when set, JPEGs are decoded at a reduced DCT scale that keeps the shorter
      side at least this long (much faster for large photos that will be downscaled anyway).

  Raises:
    BadImage: with the reason (empty, not an image, truncated, too big, too small...).
  """
  if not data:
    raise BadImage("empty file (0 bytes)")
  try:
    im = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    # PIL's own guard (above ~179M pixels) fires while reading the header, before ours.
    raise BadImage(f"header claims too many pixels, refused before decoding: {e}") from None
  except Image.UnidentifiedImageError:
    raise BadImage(f"not a recognised image format ({len(data)} bytes, starts {data[:8]!r})") from None
  except DECODE_ERRORS as e:
    raise BadImage(f"unreadable image header: {type(e).__name__}: {e}") from None
  w, h = im.size
  if w * h > max_pixels:
    raise BadImage(f"header claims {w}x{h} = {w * h} pixels, above max_image_pixels={max_pixels}")
  if min(w, h) < min_size:
    raise BadImage(f"too small: {w}x{h}, shorter side below min_image_size={min_size}")
  try:
    if draft_short_side and im.format == "JPEG":
      scale = draft_short_side / min(w, h)
      im.draft(None, (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))))
    im.load()
    im = ImageOps.exif_transpose(im)
    return to_rgb(im)
  except DECODE_ERRORS as e:
    raise BadImage(f"corrupt or truncated image data: {type(e).__name__}: {e}") from None


def decode_image(data: bytes, *, max_pixels: int = 8192 * 8192, min_size: int = 1) -> np.ndarray:
  """Decodes encoded image bytes to a uint8 (H, W, 3) array; raises BadImage with the reason."""
  return np.asarray(load_rgb(data, max_pixels=max_pixels, min_size=min_size))


def to_rgb(im: Image.Image) -> Image.Image:
  """Converts any PIL mode to 8-bit RGB; alpha is composited on white, 16-bit scaled to 8-bit."""
  mode = im.mode
  if mode == "RGB":
    return im
  if mode in _SIXTEEN_BIT_MODES:
    a = np.asarray(im).astype(np.uint32)
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
  if mode == "I":
    # 32-bit integer images (16-bit PNGs in some PIL versions): values above 255 mean a 16-bit
    # range, otherwise the data is already 8-bit.
    a = np.asarray(im).astype(np.int64)
    if a.max(initial=0) > 255:
      a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
  if mode == "F":
    a = np.asarray(im)
    if not np.all(np.isfinite(a)):
      raise BadImage("float image with non-finite pixels")
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
  if mode == "P" and "transparency" in im.info:
    im = im.convert("RGBA")
    mode = "RGBA"
  if mode in _ALPHA_MODES:
    rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + _WHITE * (1.0 - alpha)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
  try:
    return im.convert("RGB")
  except ValueError as e:
    raise BadImage(f"cannot convert PIL mode {mode!r} to RGB: {e}") from None


def decode_text(value) -> tuple[str, bool]:
  """Returns (text, ok): str passes, UTF-8 bytes are decoded; None or invalid UTF-8 give ('', False)."""
  if value is None:
    return "", False
  if isinstance(value, str):
    return value, True
  if isinstance(value, (bytes, bytearray, memoryview)):
    try:
      return bytes(value).decode("utf-8"), True
    except UnicodeDecodeError:
      return "", False
  if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "SUO":
    return decode_text(value.item())
  return "", False


def encode_image(array: np.ndarray, *, format: str = "png", quality: int = 95) -> bytes:  # pylint: disable=redefined-builtin
  """Encodes a uint8 (H, W, 3) or (H, W) array as PNG or JPEG bytes."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise TypeError(f"encode_image needs uint8 pixels, got {array.dtype}")
  fmt = format.lower()
  if fmt not in ("png", "jpeg", "jpg"):
    raise ValueError(f"encode_image format must be 'png' or 'jpeg', got {format!r}")
  buf = io.BytesIO()
  if fmt == "png":
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
  else:
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()
