"""PatchGAN discriminator vs LDM's NLayerDiscriminator (written here in plain torch.nn)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

import psvae_jax  # noqa: F401
from psvae_jax.models.discriminator import NLayerDiscriminator


def torch_patchgan(in_ch=3, ndf=64, n_layers=3):
  """taming's NLayerDiscriminator with BatchNorm (use_actnorm=False)."""
  seq = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
  mult = 1
  for n in range(1, n_layers + 1):
    prev, mult = mult, min(2 ** n, 8)
    seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
            nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
  seq += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
  return nn.Sequential(*seq)


def _materialise(abstract: NLayerDiscriminator, seed: int = 0) -> NLayerDiscriminator:
  """Concrete numpy-filled parameters (LDM init statistics) without per-shape RNG compiles."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(path[-2].key)  # (..., DictKey(name), GetAttrKey("value"))
    shape = leaf.shape
    value = {"kernel": lambda: 0.02 * rng.standard_normal(shape),
             "scale": lambda: 1.0 + 0.02 * rng.standard_normal(shape),
             "bias": lambda: 0.05 * rng.standard_normal(shape),
             "mean": lambda: np.zeros(shape), "var": lambda: np.ones(shape)}[name]()
    return jnp.asarray(value, jnp.float32)

  graphdef, state = nnx.split(abstract)
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _copy_to_torch(model: NLayerDiscriminator, ref: nn.Sequential) -> None:
  convs = [m for m in ref if isinstance(m, nn.Conv2d)]
  norms = [m for m in ref if isinstance(m, nn.BatchNorm2d)]
  ours = [model.conv_in, *model.convs, model.conv_out]
  to_t = lambda a: torch.from_numpy(np.array(a))
  with torch.no_grad():
    for c, o in zip(convs, ours):
      c.weight.copy_(to_t(np.asarray(o.kernel[...]).transpose(3, 2, 0, 1)))
      if c.bias is not None:
        c.bias.copy_(to_t(o.bias[...]))
    for n, o in zip(norms, model.norms):
      n.weight.copy_(to_t(o.scale[...]))
      n.bias.copy_(to_t(o.bias[...]))


def test_default_shape():
  abstract = nnx.eval_shape(lambda: NLayerDiscriminator(rngs=nnx.Rngs(0)))
  out = jax.eval_shape(lambda m, x: m(x), abstract,
                       jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32))
  assert out.shape == (2, 30, 30, 1)
  assert abstract.convs[0].bias is None and abstract.conv_in.bias is not None
  assert [c.kernel.shape[-1] for c in abstract.convs] == [128, 256, 512]


@pytest.mark.slow  # random init compiles one RNG kernel per parameter shape (slow on CPU)
def test_ldm_init_statistics():
  model = NLayerDiscriminator(ndf=16, rngs=nnx.Rngs(0))
  kernel = np.asarray(model.convs[1].kernel[...])
  assert abs(kernel.std() - 0.02) < 2e-3 and abs(kernel.mean()) < 2e-3
  scale = np.asarray(model.norms[2].scale[...])
  assert abs(scale.mean() - 1.0) < 0.01 and 0.01 < scale.std() < 0.03
  assert np.all(np.asarray(model.conv_out.bias[...]) == 0)


def test_matches_torch_train_and_eval_mode():
  model = _materialise(nnx.eval_shape(lambda: NLayerDiscriminator(3, 8, 3, rngs=nnx.Rngs(0))))
  ref = torch_patchgan(3, 8, 3)
  _copy_to_torch(model, ref)
  x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  forward = nnx.jit(lambda m, a: m(a))

  ref.train()
  with torch.no_grad():
    expected = ref(xt).numpy().transpose(0, 2, 3, 1)
  out = np.asarray(forward(model, jnp.asarray(x)))  # training mode: batch statistics
  assert out.shape == (4, 2, 2, 1)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  # Running means follow torch's momentum-0.1 update. (Running variances differ by torch's
  # unbiased n/(n-1) factor; they only matter in eval mode.)
  torch_norms = [m for m in ref if isinstance(m, nn.BatchNorm2d)]
  for n, o in zip(torch_norms, model.norms):
    np.testing.assert_allclose(np.asarray(o.mean[...]), n.running_mean.numpy(), atol=1e-6)
    o.var[...] = jnp.asarray(n.running_var.numpy())

  ref.eval()
  with torch.no_grad():
    expected = ref(xt).numpy().transpose(0, 2, 3, 1)
  eval_out = nnx.jit(lambda m, a: m(a, use_running_average=True))(model, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(eval_out), expected, atol=1e-5)
