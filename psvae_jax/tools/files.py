"""Writing the tools' outputs: bytes, PNGs and JSON to local paths or gs://.

A local file is written whole or not at all (a hidden temporary file beside it, then renamed),
so an interrupted tool never leaves a truncated PNG or JSON that a re-run would take as done.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np


def write_bytes(path: str, data: bytes) -> None:
  """Writes a local or gs:// file (parent directories created)."""
  if path.startswith("gs://"):
    from etils import epath
    epath.Path(path).write_bytes(data)
    return
  path = os.path.abspath(path)
  directory, name = os.path.split(path)
  os.makedirs(directory, exist_ok=True)
  # Hidden and not ending in the file's suffix: benchmark scorers that glob '*.png' skip it.
  tmp = os.path.join(directory, f".{name}.{os.getpid()}.partial")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def png_bytes(image: np.ndarray) -> bytes:
  """A uint8 HxWx3 (or HxW) array encoded as PNG."""
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
  return buffer.getvalue()


def write_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 image array as a PNG file (local or gs://)."""
  write_bytes(path, png_bytes(image))


def write_json(path: str, value: Any) -> None:
  """Writes `value` as indented JSON with a final newline (local or gs://)."""
  write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def write_result(path: str, result: dict[str, Any]) -> dict[str, Any]:
  """Writes a tool's result as JSON to `path`; returns it with 'json' (the path) added."""
  write_json(path, result)
  return {**result, "json": path}


def beside(json_path: str, suffix: str) -> str:
  """The path of a companion output: 'out/eval.json', '_grid.png' -> 'out/eval_grid.png'."""
  stem = json_path[:-len(".json")] if json_path.endswith(".json") else json_path
  return stem + suffix
