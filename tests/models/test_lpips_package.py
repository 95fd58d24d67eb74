"""LPIPS-VGG16 against the `lpips` package's own network and forward pass: the same random
VGG16 trunk and the package's shipped v0.1 linear heads loaded into both, 64 px.

`lpips` is installed without its dependencies (`pip install --no-deps`, see
requirements-test-nodeps.txt); its torchvision import is served by `torchvision_stub`.
"""
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torchvision_stub
from psvae_jax.ports.torch_hub import lpips_from_state_dicts


@pytest.fixture
def lpips_package(monkeypatch):
  torchvision_stub.install(monkeypatch)
  try:
    return importlib.import_module("lpips")
  except ModuleNotFoundError as e:
    pytest.fail(f"the lpips package is not installed ({e}); install it with "
                "`pip install --no-deps -r requirements-test-nodeps.txt`")


def test_lpips_matches_the_lpips_package(lpips_package):
  torch.manual_seed(0)
  # pretrained=True: the package's v0.1 heads; pnet_rand=True: a random trunk (no download).
  ref = lpips_package.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
  trunk = {}
  for k in range(1, 6):
    for name, value in getattr(ref.net, f"slice{k}").state_dict().items():
      trunk[f"features.{name}"] = value.numpy()  # slice<k>.<i> holds torchvision's features[i]
  heads = {k: v.numpy() for k, v in ref.state_dict().items() if re.match(r"lin\d\.", k)}
  assert len(heads) == 5 and float(min(h.min() for h in heads.values())) >= 0  # trained heads
  model = lpips_from_state_dicts(trunk, heads)

  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
  y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
  to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    expected = ref(to_t(x), to_t(y)).numpy().reshape(-1)
  out = np.asarray(jax.jit(lambda m, a, b: m(a, b))(model, jnp.asarray(x), jnp.asarray(y)))
  err = float(np.abs(out - expected).max())
  print(f"LPIPS vs lpips package: max abs diff {err:.3g} (distances {expected})")
  assert expected.min() > 1e-3  # distances of a meaningful size, so the tolerance means something
  assert err <= 1e-4, (err, out, expected)
  np.testing.assert_allclose(out, expected, rtol=1e-4)
