"""psvae_jax.api on tiny runs: any number of images (padded over 8 devices), PIL or arrays in,
the same numbers as the task's own functions, deterministic sampling, clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from psvae_jax import api
from psvae_jax.tasks.autoencoder import reconstruct, unit_range_to_uint8
from helpers.runs import STEP, write_psvae_run, write_t2i_run


@pytest.fixture(scope="module")
def psvae_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("api") / "psvae")
  write_psvae_run(workdir)
  return workdir


def test_autoencoder_on_any_number_of_images(psvae_run):
  ae = api.Autoencoder.load(psvae_run)  # all 8 devices
  assert ae.step == STEP and ae.weights == "ema" and ae.image_size == 32
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 32, 32, 3), np.uint8)  # 3 images over 8 devices: padded
  z = ae.encode(images)
  assert z.shape == (3, 4, 4, 8) and z.dtype == np.float32
  recon = ae.reconstruct(images)
  assert recon.shape == (3, 32, 32, 3) and recon.dtype == np.uint8
  _, _, z_ref, x_ref = reconstruct(ae.model, jnp.asarray(images), ae.config.model)
  np.testing.assert_allclose(z, np.asarray(z_ref), atol=1e-5)
  assert np.abs(recon.astype(int) - np.asarray(unit_range_to_uint8(x_ref)).astype(int)).max() <= 1
  assert np.abs(ae.decode(z).astype(int) - recon.astype(int)).max() <= 1
  assert ae.features(images).shape == (3, 4, 4, 64)
  # PIL images of another size are resized to the run's size; one HWC array is one image.
  pil = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)) for _ in range(2)]
  assert ae.encode(pil).shape == (2, 4, 4, 8)
  assert ae.encode(images[0]).shape == (1, 4, 4, 8)
  stats = np.asarray(ae.latent_stats["std"], np.float32)
  np.testing.assert_allclose(ae.encode(images, normalize=True) * stats
                             + np.asarray(ae.latent_stats["mean"], np.float32), z, atol=1e-5)


def test_autoencoder_input_errors(psvae_run, tmp_path):
  ae = api.Autoencoder.load(psvae_run, mesh=api.sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  with pytest.raises(ValueError, match=r"image 0: expected uint8 \(H, W, 3\)"):
    ae.encode(np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match=r"latents must be \(N, h, w, 8\)"):
    ae.decode(np.zeros((1, 4, 4, 3)))
  with pytest.raises(FileNotFoundError, match="no such run directory"):
    api.Autoencoder.load(str(tmp_path / "missing"))


def test_generator_is_deterministic_and_prompt_major(tmp_path):
  workdir = str(tmp_path / "t2i")
  write_t2i_run(workdir)
  with pytest.raises(ValueError, match="'t2i' run; Autoencoder needs"):
    api.Autoencoder.load(workdir)
  gen = api.Generator.load(f"{workdir}/checkpoints/{STEP}")
  images = gen.generate(["a red circle", "a blue square"], seed=3, steps=1, num_images=2)
  assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
  again = gen.generate(["a red circle", "a blue square"], seed=3, steps=1, num_images=2)
  np.testing.assert_array_equal(images, again)
  assert gen.sampling_settings()["sample_steps"] == 2  # the override does not stick


@pytest.mark.slow
def test_editor_keeps_the_input_kind_and_size(tmp_path):
  from test_edit import tiny_edit_config
  from test_edit import write_run as write_edit_run

  workdir = str(tmp_path / "edit")
  write_edit_run(workdir, tiny_edit_config())
  editor = api.Editor.load(workdir)
  size = int(editor.config.data.image_size)
  rng = np.random.default_rng(0)
  arrays = rng.integers(0, 256, (3, size, size, 3), np.uint8)
  edited = editor.edit(arrays, "make it blue", seed=1, steps=1)
  assert edited.shape == arrays.shape and edited.dtype == np.uint8
  np.testing.assert_array_equal(edited, editor.edit(arrays, "make it blue", seed=1, steps=1))
  pil = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), np.uint8))]
  (out,) = editor.edit(pil, ["add a red circle"], steps=1)
  assert isinstance(out, Image.Image) and out.size == (30, 20)
