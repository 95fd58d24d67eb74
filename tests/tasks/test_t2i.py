"""T2I stage: initialisation from a PS-VAE run, training steps, samples, cached inputs, tokens."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import runs, sharding
from psvae_jax import train as train_lib
from psvae_jax import train_state as ts
from psvae_jax.config_base import to_json
from psvae_jax.tasks import get_task
from psvae_jax.tasks import t2i
from psvae_jax.tokenizers import ByteTokenizer, build_tokenizer, tokenize

from helpers.configs import t2i_config_for, tiny_psvae_config
from helpers.runs import read_run

ONE_DEVICE = jax.devices()[:1]  # compiles on 1 device are the cheapest; sharding is tested apart
LATENT_STATS = {"mean": [0.1 * i for i in range(8)], "std": [0.5 + 0.1 * i for i in range(8)],
                "count": 128}

@pytest.fixture(scope="module")
def psvae_run(tmp_path_factory):
  """A workdir exactly as a finished PS-VAE run leaves it (config, state, EMA, latent
  statistics), written from the PS-VAE task's own layout with random host-side values: the run
  itself is tested in test_psvae.py, and compiling its step here would dominate this file."""
  workdir = str(tmp_path_factory.mktemp("psvae"))
  config = tiny_psvae_config()
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




def test_t2i_from_psvae_run(tmp_path, psvae_run):
  psvae_dir, psvae_config = psvae_run
  _, psvae_restored = read_run(psvae_dir, psvae_config)
  stats = psvae_restored["extras"]["latent_stats"]

  workdir = str(tmp_path / "t2i")
  config = t2i_config_for(psvae_config, init=psvae_dir)
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


def test_autoencoder_section_comes_from_the_psvae_run(psvae_run):
  psvae_dir, psvae_config = psvae_run
  config = t2i_config_for(psvae_config, init=psvae_dir)
  with config.unlocked():
    config.model.autoencoder.latent_channels = 4
    config.model.autoencoder.remat = True
  adopted = runs.with_parent_config(config)
  assert adopted.model.autoencoder.latent_channels == psvae_config.model.latent_channels == 8
  assert adopted.model.autoencoder.remat  # this run's own setting
  assert adopted.model.autoencoder.svae_depth == psvae_config.model.svae_depth
  assert adopted.is_locked == config.is_locked
  with config.unlocked():
    config.init = ""
  assert runs.with_parent_config(config) is config  # scratch: the local default


def test_cached_inputs_give_the_same_loss():
  config = t2i_config_for(tiny_psvae_config(), **{"model.require_autoencoder": False,
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
    cached_task = get_task(t2i_config_for(tiny_psvae_config(), **{
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
