"""The pieces of torchvision that the `lpips` and `pytorch-fid` packages read, in plain torch.nn.

The registry's torchvision wheel does not load against the CPU torch used here. `lpips` needs
from it only `torchvision.models.vgg16(pretrained=False).features`, torchvision's VGG16 layer
list (`features.<i>` indices as torchvision's). pytorch-fid builds `torchvision.models.
inception_v3(weights=None)` and subclasses `torchvision.models.inception.InceptionA/C/E`,
overriding their forward passes with its FID patches: the stand-in gives torchvision's layer
names, shapes and (unpatched) forward passes, so pytorch-fid's own code does the rest.
`install(monkeypatch)` puts this stand-in in `sys.modules` as `torchvision` before either
package is imported; random weights, no download.
"""
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class TorchVGG16(nn.Module):
  """torchvision `vgg16()` minus the classifier: `features.<i>` indices as torchvision's."""

  def __init__(self):
    super().__init__()
    layers, in_ch = [], 3
    for v in VGG16_CFG:
      if v == "M":
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        in_ch = v
    self.features = nn.Sequential(*layers)


def vgg16(pretrained: bool = False, weights=None, **kwargs) -> TorchVGG16:
  if pretrained or weights is not None:
    raise RuntimeError("the torchvision stand-in has no pretrained weights (no downloads)")
  return TorchVGG16()


# --- torchvision.models.inception: Inception-v3 without the auxiliary head ----------------------

class BasicConv2d(nn.Module):
  """Convolution without bias, batch norm (eps 0.001), ReLU."""

  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg3(x):
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([
        self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
  def __init__(self, cin, channels_7x7):
    super().__init__()
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                      F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(_avg3(x))], 1)


class Inception3(nn.Module):
  """torchvision's Inception-v3 trunk and `fc` head (no auxiliary classifier)."""

  def __init__(self, num_classes=1000):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
    self.Mixed_5b, self.Mixed_5c = InceptionA(192, 32), InceptionA(256, 64)
    self.Mixed_5d = InceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
    self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b, self.Mixed_7c = InceptionE(1280), InceptionE(2048)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(2048, num_classes)


def inception_v3(*, num_classes=1000, aux_logits=True, weights=None, init_weights=None):
  """torchvision's builder, for the arguments pytorch-fid passes (random init only)."""
  del init_weights  # torch's default initialisation; the tests set their own values
  if weights is not None:
    raise RuntimeError("the torchvision stand-in has no pretrained weights (no downloads)")
  if aux_logits:
    raise NotImplementedError("the torchvision stand-in has no auxiliary Inception head")
  return Inception3(num_classes)


def install(monkeypatch) -> None:
  """Makes `import torchvision` / `torchvision.models[.inception]` resolve to this stand-in."""
  package = types.ModuleType("torchvision")
  models = types.ModuleType("torchvision.models")
  inception = types.ModuleType("torchvision.models.inception")
  for cls in (BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE,
              Inception3):
    setattr(inception, cls.__name__, cls)
  models.vgg16 = vgg16
  models.inception_v3 = inception_v3
  models.inception = inception
  package.models = models
  package.__version__ = "0.28.0+stub"  # the torchvision pin that matches torch 2.13.0
  monkeypatch.setitem(sys.modules, "torchvision", package)
  monkeypatch.setitem(sys.modules, "torchvision.models", models)
  monkeypatch.setitem(sys.modules, "torchvision.models.inception", inception)
