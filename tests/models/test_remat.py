"""Named remat policies (psvae_jax.models.remat): one table, validated names, wired into the
MMDiT, the ViT stack and the pixel decoder; same loss and gradients as no remat, and less
activation memory where XLA:CPU honours it (scanned layers)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psvae_jax.models import mmdit, remat
from psvae_jax.models.pixel_decoder import PixelDecoder
from psvae_jax.models.vit import TransformerStack

TINY_MMDIT = mmdit.MMDiTConfig(num_layers=2, num_heads=2, head_dim=8, in_channels=4, patch_size=2,
                               sample_size=8, pos_embed_max_size=8, text_dim=12, pooled_dim=10)
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def test_names_map_to_policies_and_unknown_names_are_errors():
  assert remat.NAMES == ("", "full", "dots", "dots_no_batch")
  assert remat.policy_name(False) == remat.policy_name(None) == remat.policy_name("") == ""
  assert remat.policy_name(True) == "full"
  assert remat.POLICIES["dots"] is jax.checkpoint_policies.dots_saveable
  f = lambda x: x
  assert remat.checkpoint(f, "") is f and remat.nnx_checkpoint(f, False) is f
  for build in (lambda: mmdit.MMDiT(TINY_MMDIT, remat_policy="dot", rngs=nnx.Rngs(0)),
                lambda: TransformerStack(1, 8, 2, 16, remat="dot", rngs=nnx.Rngs(0)),
                lambda: PixelDecoder(4, 3, 8, (1,), 0, (), 4, norm_groups=4, remat="dot",
                                     rngs=nnx.Rngs(0))):
    with pytest.raises(ValueError, match=r"unknown remat.* 'dot'; expected a bool or one of "
                                         r"\['', 'full', 'dots', 'dots_no_batch'\]"):
      nnx.eval_shape(build)


def _checkpoint_policies(fn, *args) -> list:
  """The `policy` of every checkpoint (remat) equation in fn's jaxpr, nested ones included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "remat2":  # jax.checkpoint's primitive
        found.append(eqn.params["policy"])
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def _mmdit_loss(name, scan=False):
  model = nnx.eval_shape(lambda: mmdit.MMDiT(TINY_MMDIT, remat_policy=name, scan_layers=scan,
                                             rngs=nnx.Rngs(0)))
  graph, params = nnx.split(model)
  return lambda p, *a: jnp.mean(nnx.merge(graph, p)(*a) ** 2), params


def _mmdit_inputs():
  keys = jax.random.split(jax.random.key(1), 3)
  return (jax.random.normal(keys[0], (2, 8, 8, 4)), jax.random.normal(keys[1], (2, 5, 12)),
          jax.random.normal(keys[2], (2, 10)), jnp.array([100.0, 700.0]))


@pytest.mark.parametrize("name", remat.NAMES)
def test_policy_names_reach_the_models(name):
  loss, params = _mmdit_loss(name)
  expected = [remat.POLICIES[name]] * TINY_MMDIT.num_layers if name else []
  assert _checkpoint_policies(loss, params, *_mmdit_inputs()) == expected
  stack = nnx.eval_shape(lambda: TransformerStack(3, 16, 2, 32, remat=name, scan_layers=True,
                                                  rngs=nnx.Rngs(0)))
  graph, state = nnx.split(stack)
  policies = _checkpoint_policies(lambda s, x: nnx.merge(graph, s)(x), state,
                                  jnp.zeros((1, 4, 16)))
  assert policies == ([remat.POLICIES[name]] if name else [])
  decoder = nnx.eval_shape(lambda: PixelDecoder(4, 3, 8, (1, 1), 0, (4,), 8, norm_groups=4,
                                                remat=name, rngs=nnx.Rngs(0)))
  graph, state = nnx.split(decoder)
  policies = _checkpoint_policies(lambda s, z: nnx.merge(graph, s)(z), state,
                                  jnp.zeros((1, 4, 4, 4)))
  # mid block; 4 px level: ResNet, attention, upsampler; 8 px level: ResNet
  assert policies == ([remat.POLICIES[name]] * 5 if name else [])


def _randomized(model_state, std=0.2):
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: jnp.asarray(std * rng.standard_normal(a.shape), a.dtype),
                      model_state)


@pytest.mark.slow  # about 15 s: two MMDiT gradients compiled
def test_mmdit_remat_same_loss_and_grads():
  plain, params = _mmdit_loss("")
  rematted, _ = _mmdit_loss("dots_no_batch", scan=False)
  params = _randomized(params)  # zero-initialised output layers would hide differences
  args = _mmdit_inputs()
  step = jax.jit(lambda p, *a: (jax.value_and_grad(plain)(p, *a),
                                jax.value_and_grad(rematted)(p, *a)),
                 compiler_options=FAST_COMPILE)
  (loss_a, grads_a), (loss_b, grads_b) = step(params, *args)
  assert float(loss_a) > 0
  np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_vit_remat_same_loss_and_grads_less_memory_when_scanned():
  # XLA:CPU only keeps the recomputation in the backward pass inside a loop (scan): with
  # unrolled layers its scheduler recomputes early and the temp memory does not change.
  x = jax.random.normal(jax.random.key(0), (2, 128, 32))
  results = {}
  for name in ("", "full"):
    stack = TransformerStack(3, 32, 2, 64, remat=name, scan_layers=True, rngs=nnx.Rngs(0))
    graph, state = nnx.split(stack)
    loss = lambda s, x: jnp.mean(nnx.merge(graph, s)(x) ** 2)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(state, x).compile()
    results[name] = (compiled(state, x), compiled.memory_analysis().temp_size_in_bytes)
  (loss, grads), temp = results[""]
  (loss_r, grads_r), temp_r = results["full"]
  np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  # Keeping each layer's input instead of every activation: 4.6 MB -> 1.5 MB here.
  assert temp_r < 0.5 * temp, (temp_r, temp)
