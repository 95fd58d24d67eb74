"""Run logging: clu metric writers (TensorBoard), WORKDIR/metrics.jsonl, sample PNGs.

Only process 0 writes. Every logged step appends one JSON object with `step` and the scalars.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping

import jax
import numpy as np
from PIL import Image


def _is_main() -> bool:
  return jax.process_index() == 0


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """(N, H, W, 3) uint8 -> one (rows*H, cols*W, 3) grid with 2 px white gutters."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  columns = columns or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / columns))
  pad = 2
  grid = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = img
  return grid


class RunLogger:
  """Writes scalars to TensorBoard (clu) and metrics.jsonl, images to samples/ and TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.workdir = workdir
    self.writer = None
    if not _is_main():
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    if tensorboard:
      from clu import metric_writers  # imports TensorFlow: only when TensorBoard is wanted
      self.writer = metric_writers.create_default_writer(workdir, just_logging=False,
                                                         asynchronous=True)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not _is_main():
      return
    clean = {k: float(v) for k, v in values.items()}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}, allow_nan=True) + "\n")
    if self.writer is not None:
      self.writer.write_scalars(int(step), clean)
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(clean.items()))
    logging.info("step %d: %s", step, shown)

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> list[str]:
    """Saves each (N,H,W,3) uint8 batch as WORKDIR/samples/<name>_<step>.png; returns paths."""
    if not _is_main() or not images:
      return []
    sample_dir = os.path.join(self.workdir, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    paths = []
    for name, batch in images.items():
      grid = image_grid(batch)
      path = os.path.join(sample_dir, f"{name}_{int(step):07d}.png")
      Image.fromarray(grid).save(path)
      paths.append(path)
      if self.writer is not None:
        self.writer.write_images(int(step), {name: grid[None]})
    return paths

  def close(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()
