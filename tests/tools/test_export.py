"""Export round trips: a tiny run's encoder through transformers, its pixel decoder through
diffusers' Decoder, its generator through SD3Transformer2DModel, the whole autoencoder through
plain PyTorch modules; outputs against the JAX model (float32, 1e-4), then back through the
import ports with parameters compared exactly."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from psvae_jax import api
from psvae_jax.models.mmdit import mmdit_preset
from psvae_jax.ports import diffusers as diffusers_port
from psvae_jax.ports import diffusers_export, hf
from psvae_jax.ports.common import WeightLoadError
from psvae_jax.ports.inverse import flat_params
from psvae_jax.tools import export
from psvae_jax.runs import default_mesh
from helpers.runs import write_psvae_run, write_t2i_run

TOL = 1e-4
ONE = jax.devices()[:1]


@pytest.fixture(scope="module")
def psvae_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("export") / "psvae")
  write_psvae_run(workdir)
  return workdir


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("export") / "t2i")
  write_t2i_run(workdir)
  return workdir


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _same_params(a, b) -> None:
  pa, pb = flat_params(a), flat_params(b)
  assert set(pa) == set(pb)
  for name in pa:
    assert np.array_equal(pa[name], pb[name]), name


def test_transformers_encoder_round_trip(psvae_run, tmp_path):
  import transformers

  out = str(tmp_path / "hf")
  summary = export.export(psvae_run, "transformers", out)
  assert summary["model_type"] == "dinov2_with_registers" and summary["weights"] == "ema"
  reference = transformers.Dinov2WithRegistersModel.from_pretrained(out).eval()
  ours = api.Autoencoder.load(psvae_run, mesh=default_mesh(ONE)).model.encoder
  pixels = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    expected = reference(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  diff = _max_diff(ours(jnp.asarray(pixels)), expected.last_hidden_state.numpy())
  print(f"transformers encoder max abs diff {diff:.2e}")
  assert diff <= TOL
  _same_params(ours, hf.load(out))


def test_diffusers_decoder_and_sd3_round_trip(t2i_run, tmp_path):
  from diffusers import SD3Transformer2DModel
  from diffusers.models.autoencoders.vae import Decoder

  out = tmp_path / "diffusers"
  export.export(t2i_run, "diffusers", str(out))
  model = api.Generator.load(t2i_run, mesh=default_mesh(ONE)).model
  rng = np.random.default_rng(1)

  arguments = json.loads((out / "pixel_decoder" / "decoder_config.json").read_text())
  tensors = load_file(str(out / "pixel_decoder" / "decoder.safetensors"))
  decoder = Decoder(**arguments).eval()
  decoder.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
  z = rng.standard_normal((2, 4, 4, model.pixel_decoder.z_channels)).astype(np.float32)
  with torch.no_grad():
    expected = decoder(torch.from_numpy(z.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  diff = _max_diff(model.pixel_decoder(jnp.asarray(z)), expected)
  print(f"diffusers Decoder max abs diff {diff:.2e}")
  assert diff <= TOL
  stats = json.loads((out / "pixel_decoder" / "latent_stats.json").read_text())
  assert len(stats["mean"]) == model.pixel_decoder.z_channels
  # Back through the import port's own map: the same parameters.
  targets, _ = diffusers_port.autoencoder_kl_targets(
      model.pixel_decoder, {f"decoder.{k}": v for k, v in tensors.items()})
  for name, value in flat_params(model.pixel_decoder).items():
    assert np.array_equal(np.asarray(targets[name], np.float32), value), name

  generator = model.generator
  transformer = SD3Transformer2DModel.from_pretrained(str(out / "transformer")).eval()
  c = generator.config
  x = rng.standard_normal((2, 4, 4, c.in_channels)).astype(np.float32)
  text = rng.standard_normal((2, 5, c.text_dim)).astype(np.float32)
  pooled = rng.standard_normal((2, c.pooled_dim)).astype(np.float32)
  timestep = np.array([250.0, 900.0], np.float32)
  with torch.no_grad():
    expected = transformer(hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2)),
                           encoder_hidden_states=torch.from_numpy(text),
                           pooled_projections=torch.from_numpy(pooled),
                           timestep=torch.from_numpy(timestep)).sample
  ours = generator(jnp.asarray(x), jnp.asarray(text), jnp.asarray(pooled), jnp.asarray(timestep))
  diff = _max_diff(ours, expected.numpy().transpose(0, 2, 3, 1))
  print(f"SD3Transformer2DModel max abs diff {diff:.2e}")
  assert diff <= TOL
  _same_params(generator, diffusers_port.load(str(out / "transformer")))


def test_sd3_refuses_what_it_cannot_express():
  with pytest.raises(WeightLoadError, match="DDT head"):
    diffusers_export.sd3_config(mmdit_preset("tiny"))
  with pytest.raises(WeightLoadError, match="learned position embeddings.*causal text mask"):
    diffusers_export.sd3_config(mmdit_preset("tiny", ddt_head=None, pos_embed="learned",
                                             causal_text=True))


def test_export_error_is_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "psvae_jax.tools.export", f"--workdir={tmp_path / 'none'}",
       "--to=transformers", f"--out={tmp_path / 'out'}"], capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "Traceback" not in result.stderr


def _torch_reconstruct(out, pixels_u8: np.ndarray) -> np.ndarray:
  """The autoencoder rebuilt in PyTorch from the safetensors export alone (its recipe)."""
  import transformers
  from diffusers.models.autoencoders.vae import Decoder

  from psvae_jax.ports.hf_export import layer_class

  config = json.loads((out / "autoencoder_config.json").read_text())
  tensors = {k: torch.from_numpy(v) for k, v in
             load_file(str(out / "autoencoder.safetensors")).items()}
  part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  enc_cfg = transformers.AutoConfig.for_model(**config["encoder"]["config"])
  encoder = getattr(transformers, config["encoder"]["class"].split(".")[-1])(enc_cfg).eval()
  encoder.load_state_dict(part("encoder."), strict=True)
  sv = config["semantic_vae"]
  layer_cfg = transformers.AutoConfig.for_model(**sv["layer_config"])
  cls = layer_class(sv["layer_config"]["model_type"])
  width, channels = sv["width"], sv["latent_channels"]
  modules = {}
  for name, (d_in, d_out) in (("semantic_encoder", (width, 2 * channels)),
                              ("semantic_decoder", (channels, width))):
    layers = torch.nn.ModuleList([cls(layer_cfg) for _ in range(sv["depth"])]).eval()
    layers.load_state_dict(part(f"{name}.layers."), strict=True)
    hidden = width
    proj = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.GELU(),
                               torch.nn.Linear(hidden, d_out if name == "semantic_encoder"
                                               else width))
    proj.load_state_dict(part(f"{name}.proj."), strict=True)
    modules[name] = (layers, proj)
  decoder = Decoder(**config["pixel_decoder"]).eval()
  decoder.load_state_dict(part("pixel_decoder."), strict=True)

  x = torch.from_numpy(pixels_u8.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
  mean = torch.tensor(config["image_mean"]).view(1, 3, 1, 1)
  std = torch.tensor(config["image_std"]).view(1, 3, 1, 1)
  with torch.no_grad():
    hidden = encoder(pixel_values=(x - mean) / std, output_hidden_states=True).hidden_states[-1]
    prefix = 1 + enc_cfg.num_register_tokens
    feats = torch.nn.functional.layer_norm(hidden[:, prefix:], (width,),
                                           eps=enc_cfg.layer_norm_eps)
    layers, proj = modules["semantic_encoder"]
    h = feats
    for layer in layers:
      h = layer(h)
      h = h[0] if isinstance(h, tuple) else h
    z = proj(h)[..., :channels]
    side = int(round(z.shape[1] ** 0.5))
    image = decoder(z.reshape(-1, side, side, channels).permute(0, 3, 1, 2))
  return image.permute(0, 2, 3, 1).numpy()


@pytest.mark.slow
def test_safetensors_autoencoder_rebuilds_in_pytorch(psvae_run, tmp_path):
  out = tmp_path / "st"
  export.export(psvae_run, "safetensors", str(out))
  ae = api.Autoencoder.load(psvae_run, mesh=default_mesh(ONE))
  resolution = int(ae.config.model.encoder_resolution)  # no resize on either side
  images = np.random.default_rng(2).integers(0, 256, (2, resolution, resolution, 3), np.uint8)
  from psvae_jax.tasks.autoencoder import reconstruct
  expected = np.asarray(reconstruct(ae.model, jnp.asarray(images), ae.config.model)[3])
  diff = _max_diff(_torch_reconstruct(out, images), expected)
  print(f"safetensors autoencoder (PyTorch rebuild) max abs diff {diff:.2e}")
  assert diff <= TOL
