"""LPIPS-VGG16 vs a PyTorch reference built here (torchvision's VGG16 layer list in plain torch.nn,
the `lpips` package's heads and forward), random weights, 64 px."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import psvae_jax  # noqa: F401
from psvae_jax.models.lpips import _unit_normalise
from psvae_jax.ports.common import WeightLoadError
from psvae_jax.ports.torch_hub import lpips_from_state_dicts
from torchvision_stub import TorchVGG16

TAP_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # relu1_2 .. relu5_3
CHANNELS = (64, 128, 256, 512, 512)


class TorchHeads(nn.Module):
  """`lin<k>.model = [Dropout, Conv1x1(no bias)]` as in the lpips package (use_dropout=True)."""

  def __init__(self):
    super().__init__()
    for k, c in enumerate(CHANNELS):
      setattr(self, f"lin{k}", nn.Module())
      getattr(self, f"lin{k}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))


def torch_lpips(vgg: TorchVGG16, heads: TorchHeads, x: torch.Tensor, y: torch.Tensor):
  shift = torch.tensor([-.030, -.088, -.188])[None, :, None, None]
  scale = torch.tensor([.458, .448, .450])[None, :, None, None]

  def taps(img):
    h, out = (img - shift) / scale, []
    for lo, hi in TAP_SLICES:
      for i in range(lo, hi):
        h = vgg.features[i](h)
      out.append(h)
    return out

  def normalise(t, eps=1e-10):
    return t / (torch.sqrt(torch.sum(t ** 2, dim=1, keepdim=True)) + eps)

  total = 0
  for k, (a, b) in enumerate(zip(taps(x), taps(y))):
    diff = (normalise(a) - normalise(b)) ** 2
    total = total + getattr(heads, f"lin{k}").model(diff).mean([2, 3], keepdim=True)
  return total


@pytest.fixture(scope="module")
def reference():
  torch.manual_seed(0)
  vgg, heads = TorchVGG16().eval(), TorchHeads().eval()
  with torch.no_grad():
    for k in range(5):
      w = getattr(heads, f"lin{k}").model[1].weight
      w.copy_(torch.rand(w.shape))  # non-negative, as trained LPIPS heads
  return vgg, heads


def test_lpips_matches_torch_reference(reference, tmp_path):
  vgg, heads = reference
  vgg_file = str(tmp_path / "vgg16.safetensors")
  save_file({**vgg.state_dict(), "classifier.0.weight": torch.zeros(2, 2)}, vgg_file)
  heads_np = {k: v.numpy() for k, v in heads.state_dict().items()}
  model = lpips_from_state_dicts(vgg_file, heads_np)

  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
  y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
  with torch.no_grad():
    to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
    ref = torch_lpips(vgg, heads, to_t(x), to_t(y)).numpy().reshape(-1)
  fn = jax.jit(lambda m, a, b: m(a, b))
  out = np.asarray(fn(model, jnp.asarray(x), jnp.asarray(y)))
  assert out.shape == (3,)
  err = np.abs(out - ref).max()
  assert err <= 1e-4, (err, out, ref)
  assert ref.min() > 0.05  # distances of a meaningful size, so the tolerance means something
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  assert np.abs(np.asarray(fn(model, jnp.asarray(x), jnp.asarray(x)))).max() < 1e-12


def test_unit_normalise_has_finite_gradient_at_zero_features():
  feats = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([1.0, 2.0, 0.0, 2.0]))
  np.testing.assert_allclose(np.asarray(_unit_normalise(feats))[0, 0, 0], [1 / 3, 2 / 3, 0, 2 / 3],
                             rtol=1e-6)
  grads = jax.grad(lambda f: jnp.sum(_unit_normalise(f) ** 2 + _unit_normalise(f)))(feats)
  assert np.all(np.isfinite(np.asarray(grads)))


@pytest.mark.slow
def test_lpips_gradient_is_finite_for_identical_images(reference):
  vgg, heads = reference
  model = lpips_from_state_dicts({k: v.numpy() for k, v in vgg.state_dict().items()},
                                 {k: v.numpy() for k, v in heads.state_dict().items()})
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  grads = jax.jit(jax.grad(lambda a, b: model(a, b).sum()))(x, x)
  assert np.all(np.isfinite(np.asarray(grads)))


def test_converter_is_strict(reference):
  vgg, heads = reference
  vgg_np = {k: v.numpy() for k, v in vgg.state_dict().items()}
  heads_np = {k: v.numpy() for k, v in heads.state_dict().items()}
  del heads_np["lin3.model.1.weight"]
  with pytest.raises(WeightLoadError, match="lin3.model.1.weight"):
    lpips_from_state_dicts(vgg_np, heads_np)
  heads_np = {k: v.numpy() for k, v in heads.state_dict().items()}
  heads_np["extra"] = np.zeros(1, np.float32)
  with pytest.raises(WeightLoadError, match="unexpected.*extra"):
    lpips_from_state_dicts(vgg_np, heads_np)


def test_sharded_batch_moves_no_activations_between_devices():
  """With x and y split over the devices as the training step splits its batch, LPIPS and its
  gradient w.r.t. x need no collective (a pass over concat([x, y]) needed collective-permutes
  of every VGG feature map)."""
  from flax import nnx
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from psvae_jax.models.lpips import LPIPS
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("data",), axis_types=(AxisType.Auto,))
  by_batch = NamedSharding(mesh, P("data"))
  model = LPIPS(rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  loss = lambda x, y: jnp.sum(nnx.merge(graphdef, state)(x, y))
  images = jax.ShapeDtypeStruct((len(devices), 32, 32, 3), jnp.float32, sharding=by_batch)
  text = jax.jit(jax.value_and_grad(loss)).lower(images, images).compile().as_text()
  assert not [op for op in ("collective-permute", "all-to-all", "all-gather") if op in text]
  # Only the loss's sum over the batch is reduced across devices.
  reduced = re.findall(r"= (\S+) all-reduce(?:-start)?\(", text)
  assert reduced and set(reduced) <= {"f32[]"}, reduced
