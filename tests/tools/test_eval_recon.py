"""eval_recon on a tiny trained S-VAE: JSON fields and ranges, the grid PNG, rFID only with
Inception weights (or the clearly labelled random-weights smoke mode)."""
import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from psvae_jax.data import make_eval_batches
from psvae_jax.tools import eval_recon
from psvae_jax.runs import default_mesh, load_run_model, run_config



def test_metrics_json_and_grid(tiny_run, tmp_path, parse_flags):
  out = tmp_path / "eval" / "recon.json"
  # 12 images in batches of 8 over the 8 devices: the last batch is padded.
  result = eval_recon.run_from_flags(parse_flags(eval_recon, [
      f"--workdir={tiny_run}", "--data=synthetic:shapes", "--num_images=12", "--batch_size=8",
      f"--out={out}", "--grid_images=6"]))
  written = json.loads(out.read_text())
  assert written == {k: v for k, v in result.items() if k != "json"}
  assert written["task"] == "svae" and written["step"] == 2 and written["weights"] == "ema"
  assert written["n_images"] == 12 and written["data"] == "synthetic:shapes"
  assert np.isfinite(written["psnr"]) and written["psnr"] > 0
  assert -1.0 <= written["ssim"] <= 1.0
  assert -1.0 <= written["semantic_cosine"] <= 1.0
  # No pretrained Inception and no random-weights opt-in: no rFID, with the reason.
  assert written["rfid"] is None and "inception_weights" in written["rfid_note"]
  # The tiny run trains without LPIPS: omitted, with a note.
  assert "lpips" not in written and "perceptual_weight=0" in written["lpips_note"]
  grid_path = tmp_path / "eval" / "recon_grid.png"
  assert written["grid"] == str(grid_path)
  grid = np.asarray(Image.open(grid_path))
  size, pad = 32, 2  # 6 pairs, 4 pairs (8 tiles) per row -> 2 rows x 8 columns
  assert grid.shape == (2 * (size + pad) - pad, 8 * (size + pad) - pad, 3)
  # The left tile of each pair is the original held-out image.
  data_config = eval_recon.eval_data_config(run_config(tiny_run).data, "synthetic:shapes", 12)
  first = make_eval_batches(data_config, batch_size=12, num_batches=1)[0]["image"][0]
  assert np.array_equal(grid[:size, :size], first)


@pytest.mark.slow  # 299 px Inception-v3 and two 2048x2048 eigendecompositions: ~1 min on CPU
def test_random_inception_rfid_is_labelled(tiny_run, tmp_path):
  # One device keeps the CPU-heavy Inception on the fewest images.
  result = eval_recon.evaluate_reconstruction(
      tiny_run, "synthetic:shapes", num_images=4, batch_size=4, allow_random_inception=True,
      out=str(tmp_path / "r.json"), mesh=default_mesh(jax.devices()[:1]))
  assert result["rfid"] >= 0 and np.isfinite(result["rfid"])
  assert result["rfid_random_inception"] is True
  assert "RANDOM Inception" in result["rfid_inception"]


def test_batch_size_must_split_over_devices(tmp_path):
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    eval_recon.evaluate_reconstruction(str(tmp_path), "synthetic:shapes", batch_size=12)


def test_restore_uses_ema_weights_only_for_trained_parameters(tiny_run):
  mesh = default_mesh(jax.devices()[:1])
  _, ema_model, _, ema_extras = load_run_model(tiny_run, mesh=mesh)
  _, raw_model, config, raw_extras = load_run_model(tiny_run, use_ema=False, mesh=mesh)
  assert (ema_extras["weights"], raw_extras["weights"]) == ("ema", "params")
  assert config.task == "svae" and ema_extras["step"] == 2
  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  params = lambda m, name: jax.device_get(nnx.state(getattr(m, name), nnx.Param))
  assert same(params(ema_model, "encoder"), params(raw_model, "encoder"))  # frozen
  assert not same(params(ema_model, "svae"), params(raw_model, "svae"))  # EMA != last step
