"""Analytic MMDiT training FLOPs against XLA's own count of the training step (HLO cost
analysis of `jax.grad` of a loss through the model)."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from psvae_jax.models import flops, mmdit
from psvae_jax.models.ddt_head import DDTHeadConfig

CONFIG = mmdit.MMDiTConfig(num_layers=3, num_heads=4, head_dim=32, in_channels=16, patch_size=2,
                           sample_size=16, pos_embed_max_size=16, text_dim=64, pooled_dim=64,
                           dual_attention_layers=(0,), edit=True,
                           ddt_head=DDTHeadConfig(width=256, num_heads=4))
BATCH, TEXT_LEN, SOURCE_TOKENS = 2, 16, 64


def lowered_train_step(config):
  model = nnx.eval_shape(lambda: mmdit.MMDiT(config, rngs=nnx.Rngs(0)))
  graph, params = nnx.split(model)
  size = config.sample_size
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  x = spec(BATCH, size, size, config.in_channels)

  def loss(params, x, text, pooled, t):
    out = nnx.merge(graph, params)(x, text, pooled, t, source_latents=x)
    return jnp.mean(out ** 2)

  return jax.jit(jax.grad(loss)).lower(params, x, spec(BATCH, TEXT_LEN, config.text_dim),
                                       spec(BATCH, config.pooled_dim), spec(BATCH))


def _flops(analysis):
  return (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]


def test_train_flops_match_xla_cost_analysis():
  # XLA's cost analysis of the lowered (unoptimised) step: no compilation needed.
  analytic = flops.mmdit_train_flops(CONFIG, BATCH, TEXT_LEN, source_tokens=SOURCE_TOKENS)
  measured = _flops(lowered_train_step(CONFIG).cost_analysis())
  assert abs(analytic / measured - 1) < 0.1, (analytic, measured)
  plain = dataclasses.replace(CONFIG, edit=False, ddt_head=None, dual_attention_layers=())
  assert flops.mmdit_train_flops(plain, BATCH, TEXT_LEN) < analytic
  assert flops.mmdit_train_flops(CONFIG, 2 * BATCH, TEXT_LEN,
                                 source_tokens=SOURCE_TOKENS) == 2 * analytic


@pytest.mark.slow
def test_train_flops_match_compiled_cost_analysis():
  analytic = flops.mmdit_train_flops(CONFIG, BATCH, TEXT_LEN, source_tokens=SOURCE_TOKENS)
  measured = _flops(lowered_train_step(CONFIG).compile().cost_analysis())
  assert abs(analytic / measured - 1) < 0.1, (analytic, measured)
