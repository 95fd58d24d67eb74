"""FID Inception-v3 vs a PyTorch reference built here (pytorch-fid's FIDInceptionV3 written with
plain torch.nn: torchvision is not needed), random weights; 80 px by default, 299 px slow."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import psvae_jax  # noqa: F401
from psvae_jax.models.inception import bilinear_weights, resize_bilinear
from psvae_jax.ports.common import WeightLoadError
from psvae_jax.ports.torch_hub import inception_from_state_dict


class Conv(nn.Module):
  """torchvision BasicConv2d."""

  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def avg3(x):
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class A(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = Conv(cin, 64, kernel_size=1)
    self.branch5x5_1 = Conv(cin, 48, kernel_size=1)
    self.branch5x5_2 = Conv(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, padding=1)
    self.branch_pool = Conv(cin, pool_features, kernel_size=1)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(avg3(x))], 1)


class B(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = Conv(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([
        self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class C(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = Conv(cin, 192, kernel_size=1)
    self.branch7x7_1 = Conv(cin, c7, kernel_size=1)
    self.branch7x7_2 = Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = Conv(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = Conv(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg3(x))], 1)


class D(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = Conv(cin, 192, kernel_size=1)
    self.branch3x3_2 = Conv(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = Conv(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = Conv(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                      F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class E(nn.Module):
  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = Conv(cin, 320, kernel_size=1)
    self.branch3x3_1 = Conv(cin, 384, kernel_size=1)
    self.branch3x3_2a = Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = Conv(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = Conv(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = Conv(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg3(x)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
  """pytorch-fid InceptionV3(output_blocks=[3]) with its FID blocks; keeps the `fc` head so the
  state dict has the same keys as pt_inception-2015-12-05."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = Conv(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = Conv(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = Conv(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = Conv(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = Conv(80, 192, kernel_size=3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
    self.Mixed_6a = B(288)
    self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
    self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
    self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = D(768), E(1280, False), E(2048, True)
    self.fc = nn.Linear(2048, 1008)

  def forward(self, x, resize=True):
    if resize:
      x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torch.manual_seed(0)
  net = TorchFIDInception().eval()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):  # non-trivial inference statistics
        m.weight.uniform_(0.8, 1.2)
        m.bias.normal_(0.0, 0.1)
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  path = str(tmp_path_factory.mktemp("inception") / "pt_inception.safetensors")
  save_file(net.state_dict(), path)  # includes fc.* and bn num_batches_tracked
  return net, path


def _compare(net, path, size, resize, batch=2):
  images = np.random.default_rng(0).uniform(0, 1, (batch, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), resize=resize).numpy()
  model = inception_from_state_dict(path, resize_input=resize)
  out = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(images)))
  assert out.shape == (batch, 2048)
  err = np.abs(out - ref).max()
  # Absolute 1e-4 on features of magnitude ~1 (deep net, float32 conv summation order).
  assert err <= 1e-4 * max(1.0, np.abs(ref).max()), (err, np.abs(ref).max())
  return err


def test_pool3_features_match_torch_at_80px(reference):
  net, path = reference
  _compare(net, path, 80, resize=False)


@pytest.mark.slow
def test_pool3_features_match_torch_at_299_with_resize(reference):
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


def test_converter_is_strict(reference):
  net, _ = reference
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  del state["Mixed_6c.branch7x7dbl_3.bn.running_var"]
  state["AuxLogits.fc.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(WeightLoadError, match="running_var.*\n.*AuxLogits"):
    inception_from_state_dict(state)
