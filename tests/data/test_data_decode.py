"""Robust decoding: the corrupt-data zoo, mode conversions, resizing."""
import io

import numpy as np
import pytest
from PIL import Image

from helpers.images import png_with_header_size
from psvae_jax.data.decode import decode_image, decode_text, encode_image
from psvae_jax.data.errors import BadImage, BadRecord
from psvae_jax.data.preprocess import prepare_example, resize_center_crop


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _noise(h=64, w=80, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# (name, bytes, expected reason fragment) for files that must be refused.
def _bad_files():
  jpeg = _save(Image.fromarray(_noise(128, 128)), "JPEG", quality=90)
  return [
      ("truncated_jpeg", jpeg[: len(jpeg) // 2], "truncated"),
      ("zero_byte", b"", "empty file"),
      ("text_named_jpg", b"this is not an image, just text\n", "not a recognised image"),
      ("one_by_one", _save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "too small"),
      ("bomb_20000", png_with_header_size(20000, 20000), "too many pixels"),
      ("bomb_over_bound", png_with_header_size(3000, 3000), "above max_image_pixels"),
      ("png_garbage_tail", _save(Image.fromarray(_noise()), "PNG")[:60] + b"\x00" * 40, "corrupt"),
  ]


@pytest.mark.reliability(fault="undecodable file: {name}",
                         expected="BadImage with the reason")
@pytest.mark.parametrize("name,data,reason", _bad_files(), ids=[c[0] for c in _bad_files()])
def test_bad_files_raise_badimage_with_reason(name, data, reason):
  with pytest.raises(BadImage, match=reason):
    decode_image(data, max_pixels=2000 * 2000, min_size=8)


@pytest.mark.reliability(fault="PNG header claiming 20000x20000 pixels",
                         expected="refused before any pixel is decoded")
def test_bomb_is_refused_before_decoding():
  # 20000x20000x3 would need 1.2 GB; refusing from the header is instant and allocates nothing.
  with pytest.raises(BadImage, match="too many pixels"):
    decode_image(png_with_header_size(20000, 20000), max_pixels=10**12)


@pytest.mark.reliability(fault="grayscale, 1-bit, 16-bit, CMYK, palette and alpha images",
                         expected="converted to 8-bit RGB (alpha on white)")
def test_mode_conversions():
  rgb = _noise()
  assert np.array_equal(decode_image(_save(Image.fromarray(rgb), "PNG")), rgb)
  gray = rgb[..., 0]
  out = decode_image(_save(Image.fromarray(gray), "PNG"))
  assert out.shape == (64, 80, 3) and np.array_equal(out[..., 1], gray)
  out = decode_image(_save(Image.fromarray(gray).convert("1"), "PNG"))
  assert set(np.unique(out)) <= {0, 255}
  # 16-bit grayscale: full 16-bit range maps onto 0..255.
  sixteen = np.array([[0, 257 * 128, 65535, 65535]] * 4, np.uint16)
  out = decode_image(_save(Image.fromarray(sixteen), "PNG"))
  assert out.dtype == np.uint8 and list(out[0, :3, 0]) == [0, 128, 255]
  # CMYK JPEG converted back to RGB.
  red = np.zeros((32, 32, 3), np.uint8)
  red[..., 0] = 220
  out = decode_image(_save(Image.fromarray(red).convert("CMYK"), "JPEG", quality=95))
  assert out.shape == (32, 32, 3) and abs(int(out[..., 0].mean()) - 220) < 12 and out[..., 1].mean() < 20
  # Palette PNG with a transparent index: transparent pixels become white.
  pal = Image.new("P", (16, 16), 0)
  pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
  pal.paste(1, (0, 0, 8, 16))
  out = decode_image(_save(pal, "PNG", transparency=1))
  assert (out[:, :8] == 255).all() and tuple(out[0, 12]) == (255, 0, 0)
  # RGBA half transparent black over white -> mid grey.
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 3] = 128
  out = decode_image(_save(Image.fromarray(rgba, "RGBA"), "PNG"))
  assert abs(int(out.mean()) - 127) <= 1
  la = Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1), "LA")
  assert np.array_equal(decode_image(_save(la, "PNG"))[..., 2], gray)


def test_exif_orientation_is_applied():
  im = Image.fromarray(_noise(40, 60))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise on display
  out = decode_image(_save(im, "JPEG", exif=exif.tobytes()))
  assert out.shape == (60, 40, 3)


@pytest.mark.reliability(fault="missing or non-UTF-8 text",
                         expected="reported as unusable, never raised")
def test_decode_text():
  assert decode_text("a cat") == ("a cat", True)
  assert decode_text("ünïcode".encode()) == ("ünïcode", True)
  assert decode_text(b"\xff\xfe caption in latin-1 \xe9") == ("", False)
  assert decode_text(None) == ("", False)


def test_resize_center_crop():
  img = np.zeros((100, 200, 3), np.uint8)
  img[:, 50:150] = 255  # the centre square is white, the sides black
  out = resize_center_crop(img, 32)
  # (the outermost columns see a little of the black sides through the resampling filter)
  assert out.shape == (32, 32, 3) and out[:, 1:-1].min() >= 250
  assert resize_center_crop(np.zeros((32, 32, 3), np.uint8), 32).shape == (32, 32, 3)


class _Prep:
  image_size, max_image_pixels, min_image_size, skip_uncaptioned = 32, 4000 * 4000, 8, False


@pytest.mark.reliability(fault="bad image or caption in one record",
                         expected="BadRecord naming it, or the empty caption")
def test_prepare_example_skips_or_falls_back():
  good = encode_image(_noise())
  ex = prepare_example({"_id": "x", "image": good, "caption": b"\xff\xfe"}, _Prep())
  assert ex["image"].shape == (32, 32, 3) and ex["caption"] == "" and ex["_caption_fallback"]
  bad = prepare_example({"_id": "y", "image": b""}, _Prep())
  assert isinstance(bad, BadRecord) and bad.record_id == "y" and "empty" in bad.reason

  class Strict(_Prep):
    skip_uncaptioned = True
  assert isinstance(prepare_example({"_id": "z", "image": good, "caption": None}, Strict()), BadRecord)
  flipped = prepare_example({"_id": "f", "image": good}, _Prep(), flip=True)
  plain = prepare_example({"_id": "f", "image": good}, _Prep())
  assert np.array_equal(flipped["image"], plain["image"][:, ::-1])
