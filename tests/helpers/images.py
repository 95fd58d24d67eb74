"""Crafted files shared by the data tests."""
import struct
import zlib


def png_with_header_size(width: int, height: int) -> bytes:
  """A PNG whose IHDR claims width x height (valid CRC) with a tiny IDAT: a decompression bomb as
  far as the header is concerned."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
          + chunk(b"IEND", b""))
