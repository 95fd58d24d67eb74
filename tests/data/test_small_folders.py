"""A small image folder trains the S-VAE smoke preset with the defaults (slow: two full runs).

At most 10% of a folder is held out for evaluation and evaluation repeats what it has, so a
folder of 40 images needs no data flags, and one of 60 good and 7 bad images only a higher
data.max_bad_fraction.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from psvae_jax.config_loader import REPO_ROOT

SVAE_SMOKE = os.path.join(REPO_ROOT, "configs", "svae.py") + ":smoke"


def _folder(path, good: int, bad: int) -> str:
  path.mkdir()
  rng = np.random.default_rng(0)
  for i in range(good):
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), np.uint8)).save(path / f"img{i:03d}.png")
  for i in range(bad):
    (path / f"bad{i}.jpg").write_bytes(b"not a jpeg" * (i + 1))
  return str(path)


def _train(tmp_path, folder: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "psvae_jax.main", f"--config={SVAE_SMOKE}",
       f"--workdir={tmp_path / 'run'}", f"--config.data.source=folder:{folder}", *flags],
      capture_output=True, text=True, timeout=1200, cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("good, bad, flags", [
    (40, 0, ()),
    (60, 7, ("--config.data.max_bad_fraction=0.2",)),
], ids=["40_good", "60_good_7_bad"])
def test_small_folder_trains_to_the_end(tmp_path, good, bad, flags):
  result = _train(tmp_path, _folder(tmp_path / "images", good, bad), *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  held_out = (good + bad) // 10
  assert (f"{held_out} of the {good + bad} records of folder:" in result.stderr
          and "held out for eval" in result.stderr), result.stderr[-3000:]
  assert "svae: done, step 60" in result.stderr, result.stderr[-3000:]
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "60")
