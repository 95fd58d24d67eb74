"""The toy chain's presets fit together: the pipeline runs svae -> psvae -> t2i on the
single-object world and edit on the edit world; the T2I stage's autoencoder section is exactly
the PS-VAE toy model and the edit model is the T2I model."""
from psvae_jax.config_loader import load_config
from psvae_jax.data import make_eval_batches
from psvae_jax.stage_chain import stage_configs


def test_toy_pipeline_stages_fit():
  stages = dict(stage_configs(load_config("configs/pipeline.py:toy")))
  assert list(stages) == ["svae", "psvae", "t2i", "edit"]
  svae, psvae, t2i_config = stages["svae"], stages["psvae"], stages["t2i"]
  for name, config in stages.items():
    want = "synthetic:edits" if name == "edit" else "synthetic:single"
    assert config.data.source == want and config.data.image_size == 64
  edit_model = stages["edit"].model
  for key, value in t2i_config.model.items():
    if key in edit_model and key != "max_text_len":
      assert edit_model[key] == value, key
  for key in ("encoder", "latent_channels", "svae_depth", "encoder_resolution"):
    assert svae.model[key] == psvae.model[key]  # what the PS-VAE checks when loading
  # The T2I stage's local autoencoder section (its default without config.init) is the toy
  # PS-VAE's model.
  for key, value in t2i_config.model.autoencoder.items():
    assert psvae.model[key] == value, key
  assert not psvae.model.discriminator.enabled and psvae.latent_stats_batches > 0
  # Every training caption fits the text length.
  from psvae_jax.tokenizers import build_tokenizer, tokenize
  captions = make_eval_batches(t2i_config.data, batch_size=64, num_batches=1)[0]["caption"]
  _, mask = tokenize(build_tokenizer("bytes"), captions, 10_000)
  assert mask.sum(1).max() <= t2i_config.model.max_text_len


def test_single_object_world():
  from psvae_jax.data import synthetic
  for i in range(50):
    example = synthetic.single_example(i, 64)
    scene = synthetic.Scene.from_json(example["scene"])
    assert len(scene.objects) == 1
    assert example["caption"].startswith(("a ", "an "))
  # Its own stream: not the first objects of the shapes world.
  assert synthetic.single_example(0, 64)["scene"] != synthetic.shapes_example(0, 64)["scene"]
