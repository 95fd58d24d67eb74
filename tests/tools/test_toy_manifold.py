"""toy_manifold: the "PS" data and its 8-D embedding, the command's table and JSON (few steps),
and (slow) the paper's direction: 8-D samples lie further from the data than 2-D ones."""
import json

import numpy as np
import pytest
from absl import flags

from psvae_jax.tools import toy_manifold


def test_data_embedding_and_metric():
  rng = np.random.default_rng(0)
  points = toy_manifold.ps_points(500, rng, noise=0.0)
  assert points.shape == (500, 2) and points.dtype == np.float32
  assert points[:, 0].min() >= -1.7 and points[:, 0].max() <= 1.5
  q = toy_manifold.embedding(rng)
  np.testing.assert_allclose(q.T @ q, np.eye(2), atol=1e-5)
  lifted = points @ q.T
  np.testing.assert_allclose(lifted @ q, points, atol=1e-5)  # distances are kept
  d = toy_manifold.nearest_distances(points[:10] + np.float32([0.0, 3.0]), points)
  assert d.shape == (10,) and (d > 0.5).all()
  assert toy_manifold.nearest_distances(points[:10], points).max() < 1e-3
  assert toy_manifold.top_fraction_mean(np.arange(100.0)) == 97.0  # mean of the top 5


def test_command_prints_the_table(tmp_path, capsys):
  values = flags.FlagValues()
  toy_manifold.define_flags(values)
  out = tmp_path / "toy.json"
  values(["toy_manifold", "--steps=20", "--batch=64", "--hidden=32", "--num_data=400",
          "--num_samples=100", "--sample_steps=4", f"--out={out}",
          f"--png={tmp_path / 'toy.png'}"])
  toy_manifold.run_from_flags(values)
  printed = capsys.readouterr().out
  assert "top-5% NN distance" in printed and "8-D / 2-D" in printed
  written = json.loads(out.read_text())
  for name in ("2d", "8d"):
    assert written[name]["top5_nn_distance"] >= written[name]["mean_nn_distance"] > 0
  assert written["8d"]["dim"] == 8 and "mean_off_plane_norm" in written["8d"]
  assert (tmp_path / "toy.png").is_file()


@pytest.mark.slow  # the full experiment: about a minute on 2 CPU cores
def test_8d_samples_drift_further_than_2d():
  results = toy_manifold.run_experiment()
  assert results["8d"]["top5_nn_distance"] > 1.3 * results["2d"]["top5_nn_distance"]
