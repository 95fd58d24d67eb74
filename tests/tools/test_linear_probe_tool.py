"""linear_probe on a tiny trained S-VAE: latents of labelled images -> top-1/top-5 JSON."""
import json

import pytest

from psvae_jax.tools import linear_probe



def test_probe_json(tiny_run, tmp_path, parse_flags):
  out = tmp_path / "probe.json"
  result = linear_probe.run_from_flags(parse_flags(linear_probe, [
      f"--workdir={tiny_run}", "--train_data=synthetic:shapes", "--eval_data=synthetic:shapes",
      "--num_train=60", "--num_eval=20", "--batch_size=16", "--epochs=20", f"--out={out}"]))
  written = json.loads(out.read_text())
  assert written == {k: v for k, v in result.items() if k != "json"}
  assert written["n_train"] == 60 and written["n_eval"] == 20
  assert written["num_classes"] == 18  # synthetic:shapes: colour x shape
  assert written["latent_shape"] == [4, 4, 8]  # the tiny run's h x w x latent_channels
  assert written["step"] == 2 and written["weights"] == "ema"
  for key in ("top1", "top5", "train_top1"):
    assert 0.0 <= written[key] <= 1.0
  assert written["top5"] >= written["top1"]


def test_unlabelled_source_is_refused(tmp_path):
  with pytest.raises(ValueError, match="no 'label' field"):
    linear_probe._require_labels({"image": None}, "folder:/images")
