"""T2I stage: initialisation from a PS-VAE run, training steps, samples, cached inputs, tokens."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import sharding
from psvae_jax import train as train_lib
from psvae_jax import train_state as ts
from psvae_jax.config_base import ConfigError
from psvae_jax.config_base import to_json
from psvae_jax.config_loader import load_config, set_by_path
from psvae_jax.tasks import get_task
from psvae_jax.tasks import t2i
from psvae_jax.tokenizers import ByteTokenizer, build_tokenizer, tokenize

from conftest import shrink_generator_config, tiny_svae_config
from tools.t2i_run import read_run

ONE_DEVICE = jax.devices()[:1]  # compiles on 1 device are the cheapest; sharding is tested apart
LATENT_STATS = {"mean": [0.1 * i for i in range(8)], "std": [0.5 + 0.1 * i for i in range(8)],
                "count": 128}

def _psvae_config():
  """The tiny S-VAE test config as a PS-VAE, with the smallest pixel decoder (4x4 -> 4x4 px)."""
  config = tiny_svae_config(**{"optim.ema_decay": 0.5})
  config.task = "psvae"
  config.model.pixel_decoder.ch_mult = (1,)
  config.model.pixel_decoder.num_res_blocks = 0
  config.model.pixel_decoder.attn_resolutions = ()
  config.model.pixel_decoder.resolution = 4
  return config


@pytest.fixture(scope="module")
def psvae_run(tmp_path_factory):
  """A workdir exactly as a finished PS-VAE run leaves it (config, state, EMA, latent
  statistics), written from the PS-VAE task's own layout with random host-side values: the run
  itself is tested in test_psvae.py, and compiling its step here would dominate this file."""
  workdir = str(tmp_path_factory.mktemp("psvae"))
  config = _psvae_config()
  task = get_task(config)
  mesh = sharding.make_mesh({"data": 1}, ONE_DEVICE)
  rng = np.random.default_rng(0)
  fill = lambda a: jax.device_put(
      (0.05 * rng.standard_normal(a.shape)).astype(a.dtype), a.sharding)
  with jax.set_mesh(mesh):
    layout = ts.make_train_setup(task, config, mesh)
    state = jax.tree.map(fill, layout.abstract_state)
    ema = jax.tree.map(fill, layout.abstract_ema)
    writer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), async_save=False)
    writer.save(7, state=state, ema=ema, config_json=to_json(config),
                extras={"latent_stats": LATENT_STATS})
    writer.close()
  return workdir, config


def _t2i_config(psvae_config, **overrides):
  return shrink_generator_config(load_config("configs/t2i.py:smoke"), psvae_config.model,
                                 max_text_len=32, **overrides)


def test_t2i_from_psvae_run(tmp_path, psvae_run):
  psvae_dir, psvae_config = psvae_run
  _, psvae_restored = read_run(psvae_dir, psvae_config)
  stats = psvae_restored["extras"]["latent_stats"]

  workdir = str(tmp_path / "t2i")
  config = _t2i_config(psvae_config, init=psvae_dir)
  summary = train_lib.train(config, workdir, devices=ONE_DEVICE)
  assert summary["source"] == f"init {psvae_dir}"
  assert np.isfinite(summary["last_metrics"]["loss"])
  assert np.isfinite(summary["last_eval"]["eval/flow_loss_t0.5"])
  assert summary["last_metrics"]["perf/tflops_per_device"] > 0

  step, restored = read_run(workdir, config)
  assert step == 2
  frozen = restored["state"]["frozen"].to_pure_dict()
  np.testing.assert_array_equal(frozen["latent_norm"]["mean"], np.float32(stats["mean"]))
  np.testing.assert_array_equal(frozen["latent_norm"]["std"], np.float32(stats["std"]))
  assert restored["extras"]["latent_stats"]["mean"] == pytest.approx(stats["mean"])
  # The frozen encoder is the PS-VAE's EMA encoder; only the generator trains and has EMA.
  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert same(frozen["encoder"], psvae_restored["ema"].to_pure_dict()["encoder"])
  assert not same(frozen["encoder"],
                  psvae_restored["state"]["params"].to_pure_dict()["encoder"])
  ema = restored["ema"].to_pure_dict()
  assert set(ema) == {"generator"}
  assert not same(ema["generator"], restored["state"]["params"].to_pure_dict()["generator"])
  samples = os.listdir(os.path.join(workdir, "samples"))
  assert "samples_0000002.png" in samples and "samples_reference_0000002.png" in samples


def test_autoencoder_mismatch_is_named(psvae_run):
  psvae_dir, psvae_config = psvae_run
  config = _t2i_config(psvae_config)
  config.model.autoencoder.latent_channels = 4
  with pytest.raises(ConfigError, match="latent_channels=4 but the run has 8"):
    t2i.load_psvae_weights(psvae_dir, config, sharding.make_mesh({"data": 1}, ONE_DEVICE))


def test_cached_inputs_give_the_same_loss():
  config = _t2i_config(_psvae_config(), **{"model.require_autoencoder": False,
                                           "flow.caption_dropout": 0.5})
  task = get_task(config)
  mesh = sharding.make_mesh({"data": 1}, ONE_DEVICE)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  captions = np.array(["a red circle", "", "two blue squares at the top left", "a green square",
                       "an orange triangle", "a purple circle on the right", "a yellow square",
                       "a red triangle and a blue circle"], dtype=object)
  raw = task.prepare_batch({"image": images, "caption": captions})
  key = jax.random.key(3)
  with jax.set_mesh(mesh):
    layout = ts.make_train_setup(task, config, mesh)
    state = ts.init_state(task, config, layout)
    params = ts.all_params(state)
    # Non-trivial latent statistics, so the cached path must match the normalised latent.
    params["latent_norm"]["mean"].set_value(jnp.linspace(-1.0, 1.0, 8))
    params["latent_norm"]["std"].set_value(jnp.linspace(0.5, 2.0, 8))
    state["params"], state["frozen"] = ts.split_params(layout, params)
    parts = (state["params"], state["frozen"], state["other"])

    @jax.jit
    def encode(parts, batch):
      m = layout.merge(*parts)
      states, mask = task.text_condition(m, batch)
      return t2i.image_latents(m, batch["image"], config.model.autoencoder), states, mask

    loss = jax.jit(lambda parts, batch: task.loss(layout.merge(*parts), batch, key, 0))
    latent, states, mask = jax.device_get(encode(parts, raw))
    raw_loss, raw_metrics = loss(parts, raw)
    cached_task = get_task(_t2i_config(_psvae_config(), **{
        "model.require_autoencoder": False, "flow.caption_dropout": 0.5,
        "model.cached_inputs": True}))
    cached = cached_task.prepare_batch({"latent": latent, "text_states": states,
                                        "text_mask": mask, "caption": captions})
    cached_loss, cached_metrics = loss(parts, cached)
  assert 0.0 < float(raw_metrics["caption_dropped"]) < 1.0
  assert float(cached_metrics["caption_dropped"]) == float(raw_metrics["caption_dropped"])
  np.testing.assert_allclose(float(cached_loss), float(raw_loss), rtol=1e-5)
  np.testing.assert_allclose(float(cached_metrics["latent_std"]),
                             float(raw_metrics["latent_std"]), rtol=1e-5)
  with pytest.raises(Exception, match="cached_inputs=True"):
    task.prepare_batch({"latent": latent, "text_states": states, "text_mask": mask})


def test_byte_tokenizer_round_trip_and_padding():
  tok = build_tokenizer("bytes")
  captions = ["a red circle", "", "héllo wörld"]
  ids, mask = tokenize(tok, captions, 16)
  assert ids.shape == mask.shape == (3, 16) and ids.dtype == mask.dtype == np.int32
  lengths = [len(c.encode()) + 1 for c in captions]  # + end of text
  assert mask.sum(1).tolist() == lengths
  for row, n in enumerate(lengths):
    assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
    assert ids[row, n - 1] == ByteTokenizer.eos_id
    assert (ids[row, n:] == ByteTokenizer.pad_id).all()
    assert tok.decode(ids[row]) == captions[row]
  # The empty caption is the end-of-text token alone; long captions keep it after the cut.
  assert ids[1, 0] == ByteTokenizer.eos_id
  cut, cut_mask = tokenize(tok, ["abcdefgh"], 4)
  assert cut.tolist() == [[97, 98, 99, ByteTokenizer.eos_id]] and cut_mask.all()
  with pytest.raises(TypeError, match="captions must be str"):
    tokenize(tok, [None], 4)


def test_local_hf_tokenizer(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3, "red": 4, "circle": 5}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                          unk_token="<unk>").save_pretrained(str(tmp_path))
  tok = build_tokenizer(str(tmp_path))
  ids, mask = tokenize(tok, ["a red circle", "", "blue"], 6)
  assert ids.tolist() == [[3, 4, 5, 1, 0, 0], [1, 0, 0, 0, 0, 0], [2, 1, 0, 0, 0, 0]]
  assert mask.sum(1).tolist() == [4, 1, 2]
  with pytest.raises(ValueError, match="neither 'bytes' nor an existing directory"):
    build_tokenizer(str(tmp_path / "missing"))
