"""compute_dtype='bfloat16': float32 master weights and optimizer state, bf16 matmuls.

The T2I training step is traced (not compiled) with compute_dtype='bfloat16': the state it
returns keeps every parameter, optimizer and EMA leaf float32, and nearly all of its matmul
FLOPs (forward and backward) take bf16 operands. The MMDiT's loss in bf16 stays close to the
float32 loss for the same weights.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax import sharding, train
from psvae_jax import train_state as ts
from psvae_jax.config_loader import load_config
from psvae_jax.models import mmdit
from psvae_jax.tasks import get_task

MMDIT = mmdit.MMDiTConfig(num_layers=1, num_heads=2, head_dim=16, in_channels=4, patch_size=2,
                          sample_size=8, pos_embed_max_size=8, text_dim=12, pooled_dim=10)


def _dot_flops_by_operand_dtype(jaxpr) -> dict[str, float]:
  """dot_general FLOPs of a jaxpr (nested ones included), keyed by the operands' dtypes."""
  totals: dict[str, float] = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        lhs = eqn.invars[0].aval
        (contract, _), _ = eqn.params["dimension_numbers"]
        flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
            lhs.shape[d] for d in contract)
        key = "/".join(sorted({str(v.aval.dtype) for v in eqn.invars}))
        totals[key] = totals.get(key, 0.0) + flops
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr)
  return totals


def test_bf16_train_step_keeps_float32_state_and_runs_bf16_matmuls():
  config = load_config("configs/t2i.py:smoke")
  config.compute_dtype = "bfloat16"
  config.model.cached_inputs = False
  config.model.max_text_len = 16
  config.batch_size = 2
  task = get_task(config)
  size, length = config.data.image_size, config.model.max_text_len
  batch = {"image": jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8),
           "input_ids": jax.ShapeDtypeStruct((2, length), jnp.int32),
           "attention_mask": jax.ShapeDtypeStruct((2, length), jnp.int32)}
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    layout = ts.make_train_setup(task, config, mesh)
    traced = jax.jit(train.make_train_step(task, layout, config)).trace(
        layout.abstract_state, layout.abstract_ema, batch)
  state, ema, _ = traced.out_info
  floating = [leaf.dtype for part in (state["params"], state["frozen"], state["opt_state"], ema)
              for leaf in jax.tree.leaves(part) if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert floating and set(floating) == {jnp.dtype(jnp.float32)}
  by_dtype = _dot_flops_by_operand_dtype(traced.jaxpr.jaxpr)
  # 96.5% here. The rest: float32 x float32, the bicubic resizes of the encoder input and
  # position grid (float32 on purpose); float32 x bf16, the gradients of the attention scores
  # ('xla' attention keeps its logits float32, so their cotangent is float32).
  assert by_dtype.get("bfloat16", 0.0) > 0.9 * sum(by_dtype.values()), by_dtype


def test_bf16_mmdit_matmuls_and_loss_close_to_float32():
  graph32, params = nnx.split(nnx.eval_shape(lambda: mmdit.MMDiT(MMDIT, rngs=nnx.Rngs(0))))
  graph16, _ = nnx.split(nnx.eval_shape(
      lambda: mmdit.MMDiT(MMDIT, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype),
                        params)  # zero-initialised output layers would give a trivial loss
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  keys = jax.random.split(jax.random.key(0), 4)
  args = (jax.random.normal(keys[0], (2, 8, 8, 4)), jax.random.normal(keys[1], (2, 5, 12)),
          jax.random.normal(keys[2], (2, 10)), jnp.array([200.0, 800.0]))
  target = jax.random.normal(keys[3], (2, 8, 8, 4))
  loss = lambda graph: lambda p, *a: jnp.mean((nnx.merge(graph, p)(*a) - target) ** 2)
  by_dtype = _dot_flops_by_operand_dtype(jax.make_jaxpr(loss(graph16))(params, *args).jaxpr)
  assert set(by_dtype) == {"bfloat16"}, by_dtype
  loss32, loss16 = jax.jit(lambda p, *a: (loss(graph32)(p, *a), loss(graph16)(p, *a)))(
      params, *args)
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=0.02)
