"""FID Inception-v3 against the `pytorch-fid` package's own `InceptionV3` (its FID blocks,
block wiring, resize and input scaling), random weights, no download: 80 px by default, with
the 299 px resize slow.

pytorch-fid is installed without its dependencies (`pip install --no-deps`, see
requirements-test-nodeps.txt); the torchvision base classes it subclasses are served by
`torchvision_stub`, and its weight download is replaced by a random state dict in the layout of
pt_inception-2015-12-05 (the file `inception_from_state_dict` reads).
"""
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import psvae_jax  # noqa: F401
import torchvision_stub
from psvae_jax.models.inception import bilinear_weights, resize_bilinear
from psvae_jax.ports.common import WeightLoadError
from psvae_jax.ports.torch_hub import inception_from_state_dict


def _random_fid_weights() -> dict[str, torch.Tensor]:
  """A state dict with pt_inception-2015-12-05's keys and shapes (1008 classes, no auxiliary
  head; pytorch-fid's FID blocks only override forward passes) and non-trivial BN statistics."""
  torch.manual_seed(0)
  net = torchvision_stub.inception_v3(num_classes=1008, aux_logits=False)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.8, 1.2)
        m.bias.normal_(0.0, 0.1)
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return net.state_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(pytorch-fid's InceptionV3 for pool3 features, the path of the weights it loaded)."""
  weights = _random_fid_weights()
  with pytest.MonkeyPatch.context() as mp:
    torchvision_stub.install(mp)
    mp.delitem(sys.modules, "pytorch_fid.inception", raising=False)
    try:
      fid_inception = importlib.import_module("pytorch_fid.inception")
    except ModuleNotFoundError as e:
      pytest.fail(f"the pytorch-fid package is not installed ({e}); install it with "
                  "`pip install --no-deps -r requirements-test-nodeps.txt`")
    mp.setattr(fid_inception, "load_state_dict_from_url", lambda url, **kw: weights)
    net = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  path = str(tmp_path_factory.mktemp("inception") / "pt_inception.safetensors")
  save_file(weights, path)  # includes fc.* and bn num_batches_tracked
  return net, path


def _compare(net, path, size, resize, batch=2):
  images = np.random.default_rng(0).uniform(0, 1, (batch, size, size, 3)).astype(np.float32)
  net.resize_input = resize
  with torch.no_grad():
    ref = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))[0].flatten(1).numpy()
  model = inception_from_state_dict(path, resize_input=resize)
  out = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(images)))
  assert out.shape == (batch, 2048)
  err = np.abs(out - ref).max()
  # Absolute 1e-4 on features of magnitude ~1 (deep net, float32 conv summation order).
  assert err <= 1e-4 * max(1.0, np.abs(ref).max()), (err, np.abs(ref).max())
  print(f"pool3 features, {size} px (resize {resize}): max abs diff {err:.2e}")
  return err


def test_pool3_features_match_pytorch_fid_at_80px(reference):
  net, path = reference
  _compare(net, path, 80, resize=False)


@pytest.mark.slow
def test_pool3_features_match_pytorch_fid_at_299_with_resize(reference):
  net, path = reference
  _compare(net, path, 128, resize=True)


@pytest.mark.parametrize("size_in,size_out", [(80, 299), (301, 299), (256, 299), (7, 3)])
def test_bilinear_resize_matches_torch(size_in, size_out):
  x = np.random.default_rng(1).standard_normal((1, size_in, size_in + 3, 2)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                      size=(size_out, size_out + 1), mode="bilinear",
                      align_corners=False).numpy().transpose(0, 2, 3, 1)
  out = np.asarray(resize_bilinear(jnp.asarray(x), (size_out, size_out + 1)))
  np.testing.assert_allclose(out, ref, atol=2e-6)
  np.testing.assert_allclose(bilinear_weights(size_in, size_out).sum(1), 1.0)


def test_converter_is_strict():
  state = {k: v.numpy() for k, v in _random_fid_weights().items()}
  del state["Mixed_6c.branch7x7dbl_3.bn.running_var"]
  state["AuxLogits.fc.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(WeightLoadError, match="running_var.*\n.*AuxLogits"):
    inception_from_state_dict(state)
