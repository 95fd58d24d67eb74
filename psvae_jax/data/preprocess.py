"""Turns a raw record from any source into a training example (fixed-size uint8 images).

A raw record is a dict: '_id' (names the record in error reports) and fields:
- 'image', 'source_image': encoded bytes, or a uint8 (H, W, 3) array (already decoded);
- 'edit_mask': a bool (H, W) array aligned with 'image';
- 'caption', 'instruction': str, UTF-8 bytes, or None (missing: the source has captions but not
  for this record);
- 'label': int;
- anything else: str, number or numpy array, passed through unchanged.
The output has the same fields with images as uint8 (S, S, 3), masks bool (S, S), texts str,
label int32, plus '_caption_fallback' (bool, counted by the pipeline).
"""
import numpy as np
from PIL import Image

from psvae_jax.data.decode import DECODE_ERRORS, load_rgb, decode_text
from psvae_jax.data.errors import BadImage, BadRecord

IMAGE_KEYS = ("image", "source_image")
TEXT_KEYS = ("caption", "instruction")
MASK_KEY = "edit_mask"


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
  """The centred square (left, top, right, bottom) of side min(width, height)."""
  side = min(width, height)
  left = (width - side) // 2
  top = (height - side) // 2
  return left, top, left + side, top + side


def resize_center_crop(image, size: int, *, resample=Image.BICUBIC) -> np.ndarray:
  """Resizes the shorter side to `size` and centre-crops: PIL image or array -> (size, size[, C]).

  The crop is taken in source coordinates and resized in one antialiased PIL call.
  """
  if not isinstance(image, Image.Image):
    image = np.asarray(image)
    if image.shape[:2] == (size, size):
      return image
    image = Image.fromarray(image)
  im = image
  w, h = im.size
  if (w, h) == (size, size):
    return np.asarray(im)
  box = center_crop_box(w, h)
  return np.asarray(im.resize((size, size), resample, box=box, reducing_gap=3.0))


def _prepare_image(value, cfg, *, draft: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
  """Returns (pixels (S, S, 3) uint8, decoded (W, H)).

  draft=False decodes JPEGs at full size, so that the returned size is the true one (needed when
  sizes are compared across the images and masks of an edit record).
  """
  size = cfg.image_size
  if isinstance(value, (bytes, bytearray, memoryview)):
    im = load_rgb(bytes(value), max_pixels=cfg.max_image_pixels, min_size=cfg.min_image_size,
                  draft_short_side=size if draft else None)
    return resize_center_crop(im, size), im.size
  if isinstance(value, np.ndarray):
    if value.dtype != np.uint8 or value.ndim != 3 or value.shape[-1] != 3:
      raise BadImage(f"decoded image must be uint8 (H, W, 3), got {value.dtype} {value.shape}")
    h, w = value.shape[:2]
    if min(w, h) < cfg.min_image_size:
      raise BadImage(f"too small: {w}x{h}, shorter side below min_image_size={cfg.min_image_size}")
    return resize_center_crop(value, size), (w, h)
  raise BadImage(f"image field has unsupported type {type(value).__name__}")


def prepare_example(raw, cfg, *, flip: bool = False):
  """Converts a raw record to an example dict, or returns BadRecord(id, reason) if unusable."""
  if isinstance(raw, BadRecord):
    return raw
  record_id = raw.get("_id", "?")
  out = {}
  caption_fallback = False
  try:
    sizes = {}
    # Edit records compare sizes between images (and the mask): JPEG draft decoding would
    # report reduced sizes that differ between a JPEG and a PNG of the same image.
    draft = "source_image" not in raw and MASK_KEY not in raw
    for key in IMAGE_KEYS:
      if key in raw:
        out[key], sizes[key] = _prepare_image(raw[key], cfg, draft=draft)
    if len(set(sizes.values())) > 1:
      raise BadImage(f"source_image size {sizes['source_image']} differs from image size {sizes['image']}")
    if MASK_KEY in raw:
      mask = np.asarray(raw[MASK_KEY]).astype(bool)
      if "image" in sizes and mask.shape != sizes["image"][::-1]:
        raise BadImage(f"edit_mask shape {mask.shape} does not match image (H, W) {sizes['image'][::-1]}")
      out[MASK_KEY] = resize_center_crop(mask.astype(np.uint8), cfg.image_size,
                                         resample=Image.NEAREST).astype(bool)
  except BadImage as e:
    return BadRecord(record_id, str(e))
  except DECODE_ERRORS as e:  # a decoder error outside load_rgb (e.g. during the resize)
    return BadRecord(record_id, f"{type(e).__name__}: {e}")
  for key in TEXT_KEYS:
    if key in raw:
      text, ok = decode_text(raw[key])
      if not ok:
        if key == "instruction" or cfg.skip_uncaptioned:
          return BadRecord(record_id, f"missing or non-UTF-8 {key}")
        caption_fallback = True
      out[key] = text
  if "label" in raw:
    out["label"] = np.int32(raw["label"])
  for key, value in raw.items():
    if key.startswith("_") or key in out or key in IMAGE_KEYS or key in TEXT_KEYS:
      continue
    out[key] = value
  if flip:
    for key in (*IMAGE_KEYS, MASK_KEY):
      if key in out:
        out[key] = np.ascontiguousarray(out[key][:, ::-1])
  out["_caption_fallback"] = caption_fallback
  return out
