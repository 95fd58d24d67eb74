"""Every evaluation function runs its dots and convolutions at Precision.HIGHEST.

Each function is lowered (StableHLO text, nothing is compiled) through a recording `jax.jit`,
and every `dot_general` / `convolution` in it must carry precision HIGHEST for both operands:
the backend default (one bfloat16 pass on TPU, TF32 on GPU) would make the metrics differ by
backend, which no CPU run shows otherwise.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psvae_jax.metrics import fd_dinov2, fid, linear_probe, lpips, ssim
from psvae_jax.models import encoders, inception
from psvae_jax.models import lpips as lpips_model
from psvae_jax.tools import eval_recon

_OPS = re.compile(r"stablehlo\.(dot_general|convolution)\b.*")


def _imprecise_ops(text: str) -> list[str]:
  ops = [m.group(0) for m in _OPS.finditer(text)]
  assert ops, "no dot_general/convolution lowered: the check would be empty"
  highest = ("precision = [HIGHEST, HIGHEST]",
             "precision_config = [#stablehlo<precision HIGHEST>, #stablehlo<precision HIGHEST>]")
  return [op[:160] for op in ops if not any(h in op for h in highest)]


@pytest.fixture
def lowered_texts(monkeypatch):
  """The StableHLO of every call of a `jax.jit`-ed function while the test runs."""
  texts = []
  real_jit = jax.jit

  def recording_jit(fn, **kwargs):
    jitted = real_jit(fn, **kwargs)

    def call(*args, **kw):
      texts.append(jitted.lower(*args, **kw).as_text())
      return jitted(*args, **kw)

    return call

  monkeypatch.setattr(jax, "jit", recording_jit)
  return texts


def _lowered(fn, *args):
  return jax.jit(fn).lower(*args).as_text()


def _assert_highest(texts):
  assert texts
  for text in texts:
    assert _imprecise_ops(text) == []


def test_the_check_sees_default_precision():
  text = _lowered(lambda x: x @ x, jnp.ones((4, 4)))
  assert len(_imprecise_ops(text)) == 1


def test_lpips_metric():
  model = nnx.eval_shape(lambda: lpips_model.LPIPS(rngs=nnx.Rngs(0)))
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  _assert_highest([lpips._lpips_batch.lower(model, x, x).as_text()])


@pytest.fixture(scope="module")
def fid_inception():
  # Zero weights (the random initialiser takes half a minute on 2 cores): only the ops count.
  abstract = nnx.eval_shape(lambda: inception.FIDInceptionV3(resize_input=False,
                                                             rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state))


def test_fid_inception_features(lowered_texts, fid_inception):
  fid.inception_feature_fn(fid_inception)(jnp.zeros((1, 75, 75, 3)))
  _assert_highest(lowered_texts)


def test_eval_recon_inception_features(lowered_texts, fid_inception):
  state = nnx.split(fid_inception)[1]
  eval_recon.make_feature_fn(fid_inception)(state, jnp.zeros((1, 75, 75, 3), jnp.uint8))
  _assert_highest(lowered_texts)


def test_dinov2_features(lowered_texts):
  model = encoders.build_encoder("tiny", rngs=nnx.Rngs(0))
  fd_dinov2.dinov2_feature_fn(model, image_size=28)(jnp.zeros((1, 28, 28, 3)))
  _assert_highest(lowered_texts)


def test_linear_probe(lowered_texts):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(16, 6)).astype(np.float32), rng.integers(0, 3, 16)
  linear_probe.linear_probe(x, y, x, y, num_classes=3, epochs=2)
  _assert_highest(lowered_texts)


def test_ssim_has_no_reduced_precision_ops():
  text = _lowered(lambda a, b: ssim.ssim(a, b, data_range=2.0), jnp.ones((1, 16, 16, 3)),
                  jnp.ones((1, 16, 16, 3)))
  # Separable filtering by sums of shifted products: no dot or convolution at all.
  assert not _OPS.search(text)
