"""configs/pipeline.py: stages in sequence, each from the previous one's workdir; re-running
skips finished stages."""
import os

import pytest

from psvae_jax import stage_chain
from psvae_jax.config_base import ConfigError
from psvae_jax.config_loader import load_config

TINY = ("model.svae_depth=1", "model.latent_channels=8", "model.pixel_decoder.ch_mult=(1,1,1,2)",
        "model.pixel_decoder.resolution=32", "data.image_size=32", "batch_size=8",
        "total_steps=2", "eval_every=0", "checkpoint_every=2", "logging.tensorboard=False",
        "data.synthetic_size=512")


def _config():
  config = load_config("configs/pipeline.py:smoke")
  config.stages = config.stages[:2]  # S-VAE -> PS-VAE: the chaining logic at the least cost
  config.overrides = tuple(f"{stage}.{item}" for stage in ("svae", "psvae") for item in TINY) + (
      "psvae.latent_stats_batches=1", "psvae.loss.disc_start=1")
  return config


@pytest.mark.reliability(fault="pipeline override of an unknown stage or key",
                         expected="ConfigError / KeyError naming it")
def test_stage_override_errors():
  assert [s.split("=")[0] for s in load_config("configs/pipeline.py:smoke").stages] == [
      "svae", "psvae", "t2i", "edit"]
  config = _config()
  config.overrides = ("nope.total_steps=1",)
  with pytest.raises(ConfigError, match="stage in \\['svae', 'psvae'\\]"):
    stage_chain.stage_configs(config)
  config.overrides = ("svae.model.no_such_key=1",)
  with pytest.raises(KeyError, match="no_such_key"):
    stage_chain.stage_configs(config)


@pytest.mark.slow
def test_pipeline_runs_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  first = stage_chain.run(_config(), workdir)
  assert first["svae"]["source"] == "scratch"
  assert first["psvae"]["source"] == f"init {os.path.join(workdir, 'svae')}"
  assert os.path.exists(os.path.join(workdir, "psvae", "checkpoints", "2"))
  again = stage_chain.run(_config(), workdir)
  assert again["svae"]["start_step"] == again["psvae"]["start_step"] == 2
  assert "final_step" in again["psvae"] and "last_metrics" not in again["psvae"]
