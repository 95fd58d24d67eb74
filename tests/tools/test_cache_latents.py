"""cache_latents: shards read back through the data pipeline give the T2I loss of the raw
images and captions (same examples, same key); a PS-VAE run needs a converted text encoder."""
import json
import os

import jax
import numpy as np
import pytest

from psvae_jax import data as data_lib
from psvae_jax.config_base import ConfigError
from psvae_jax.tasks import get_task
from psvae_jax.tools import cache_latents
from psvae_jax.runs import default_mesh, load_run_model

from helpers.runs import write_run

ONE = jax.devices()[:1]


def test_cached_loss_equals_raw_loss(t2i_run, tmp_path, parse_flags):
  out = str(tmp_path / "cache")
  # 10 examples over 8 devices in batches of 8: the last batch is padded; 3 shards of <= 4.
  summary = cache_latents.run_from_flags(parse_flags(cache_latents, [
      f"--workdir={t2i_run}", "--data=synthetic:single", f"--out={out}", "--num_examples=10",
      "--records_per_shard=4"]))
  assert summary["records"] == 10 and summary["bad"] == 0 and len(summary["shards"]) == 3
  assert summary["fields"] == {"latent": [4, 4, 8], "text_states": [48, 64],
                               "text_mask": [48], "caption": "str"}
  assert json.load(open(os.path.join(out, "cache_summary.json"))) == summary

  # Training batches from the cache, through the pipeline, in source order.
  cached = next(data_lib.make_train_iterator(
      {"source": summary["data_source"], "shuffle": False, "eval_size": 0, "image_size": 64},
      global_batch_size=8, seed=0))
  raw = data_lib.make_train_iterator(
      {"source": "synthetic:single", "shuffle": False, "image_size": 64, "synthetic_size": 10},
      global_batch_size=8, seed=0)
  raw = next(raw)
  assert list(cached["caption"]) == list(raw["caption"])

  task, model, config, _ = load_run_model(t2i_run, mesh=default_mesh(ONE))
  config.flow.caption_dropout = 0.5  # dropped captions: the empty caption on both paths
  cached_config = config.copy_and_resolve_references()
  cached_config.model.cached_inputs = True
  cached_task = get_task(cached_config)
  raw_batch, cached_batch = task.prepare_batch(raw), cached_task.prepare_batch(cached)
  assert cached_batch["text_states"].dtype == np.float32
  loss = jax.jit(lambda batch: task.loss(model, batch, jax.random.key(5), 0))
  raw_loss, raw_metrics = loss(raw_batch)
  cached_loss, cached_metrics = loss(cached_batch)
  assert 0.0 < float(raw_metrics["caption_dropped"]) < 1.0
  np.testing.assert_allclose(float(cached_loss), float(raw_loss), rtol=1e-5)
  np.testing.assert_allclose(float(cached_metrics["latent_std"]),
                             float(raw_metrics["latent_std"]), rtol=1e-5)


def test_bfloat16_cache_and_refusals(t2i_run, tmp_path):
  out = str(tmp_path / "bf16")
  summary = cache_latents.cache_latents(t2i_run, "synthetic:single", out, num_examples=2,
                                        batch_size=2, dtype="bfloat16",
                                        mesh=default_mesh(ONE))
  record = data_lib.decode_record(_first_record(summary["shards"][0]))
  assert record["latent"].dtype.name == "bfloat16" and record["text_mask"].dtype == np.int32
  with pytest.raises(FileExistsError, match="already holds train-"):
    cache_latents.cache_latents(t2i_run, "synthetic:single", out, num_examples=2,
                                batch_size=2, mesh=default_mesh(ONE))
  with pytest.raises(ConfigError, match="its own text encoder"):
    cache_latents.cache_latents(t2i_run, "synthetic:single", str(tmp_path / "x"),
                                num_examples=2, tokenizer="bytes", mesh=default_mesh(ONE))
  with pytest.raises(ValueError, match="pass --num_examples"):
    cache_latents.cache_latents(t2i_run, "synthetic:single", str(tmp_path / "y"),
                                batch_size=2, mesh=default_mesh(ONE))


def _first_record(path):
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.read([0])[0]
  finally:
    reader.close()


def test_psvae_run_with_a_converted_text_encoder(tmp_path, svae_config):
  from flax import nnx

  from psvae_jax.models.text_encoder import build_text_encoder
  from psvae_jax.ports.converted import save_converted

  psvae_dir = str(tmp_path / "psvae")
  config = svae_config()
  config.task = "psvae"
  write_run(psvae_dir, config)
  text_dir = str(tmp_path / "text_encoder")
  save_converted(build_text_encoder("tiny", rngs=nnx.Rngs(7)), text_dir, model_type="qwen2")
  summary = cache_latents.cache_latents(
      psvae_dir, "synthetic:shapes", str(tmp_path / "cache"), text_encoder="tiny",
      text_encoder_init=text_dir, tokenizer="bytes", max_text_len=16, num_examples=3,
      batch_size=4, mesh=default_mesh(ONE))
  assert summary["run_task"] == "psvae" and summary["records"] == 3
  assert summary["fields"]["latent"] == [4, 4, 8] and summary["fields"]["text_states"] == [16, 64]
  record = data_lib.decode_record(_first_record(summary["shards"][0]))
  assert record["latent"].shape == (4, 4, 8) and np.isfinite(record["latent"]).all()
  assert int(record["text_mask"].sum()) == 16  # every synthetic caption is cut at 16 tokens


def test_psvae_run_needs_a_pretrained_text_encoder(monkeypatch):
  config = load_config_psvae()
  with pytest.raises(ConfigError, match="--text_encoder_init is required"):
    cache_latents.t2i_config_for_psvae(config, text_encoder="tiny", text_encoder_init="",
                                       tokenizer="bytes", max_text_len=32, psvae_dir="/psvae")
  t2i = cache_latents.t2i_config_for_psvae(config, text_encoder="tiny",
                                           text_encoder_init="/te", tokenizer="bytes",
                                           max_text_len=32, psvae_dir="/psvae")
  assert t2i.init == "/psvae" and t2i.model.text_encoder_init == "/te"
  assert t2i.model.autoencoder.latent_channels == config.model.latent_channels == 16
  assert t2i.model.max_text_len == 32 and t2i.data.image_size == 64


def load_config_psvae():
  from psvae_jax.config_loader import load_config
  return load_config("configs/psvae.py:smoke")
