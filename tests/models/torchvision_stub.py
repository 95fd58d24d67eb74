"""The pieces of torchvision that the `lpips` package reads, in plain torch.nn.

The registry's torchvision wheel does not load against the CPU torch used here, and `lpips`
needs from it only `torchvision.models.vgg16(pretrained=False).features`, torchvision's VGG16
layer list (`features.<i>` indices as torchvision's). `install(monkeypatch)` puts this stand-in
in `sys.modules` as `torchvision` before `lpips` is imported; random weights, no download.
"""
import sys
import types

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


def install(monkeypatch) -> None:
  """Makes `import torchvision` / `torchvision.models` resolve to this stand-in."""
  package = types.ModuleType("torchvision")
  models = types.ModuleType("torchvision.models")
  models.vgg16 = vgg16
  package.models = models
  package.__version__ = "0.0+stub"
  monkeypatch.setitem(sys.modules, "torchvision", package)
  monkeypatch.setitem(sys.modules, "torchvision.models", models)
