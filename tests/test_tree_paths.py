"""tree_paths: pytree key objects and NNX flat-state paths name a parameter the same way."""
import jax.numpy as jnp
import optax
from flax import nnx, struct

from psvae_jax.tree_paths import flatten_dotted, path_keys, path_str


def test_pytree_and_nnx_paths_agree():
  tree = {"encoder": {"blocks": [{"kernel": 1}, {"kernel": 2}]}, "scale": 3}
  assert flatten_dotted(tree) == {"encoder.blocks.0.kernel": 1, "encoder.blocks.1.kernel": 2,
                                  "scale": 3}
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  nnx_names = sorted(path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  pure_names = sorted(flatten_dotted(nnx.state(model, nnx.Param).to_pure_dict()))
  assert nnx_names == pure_names == ["bias", "kernel"]


@struct.dataclass
class _Pair:
  left: jnp.ndarray
  right: jnp.ndarray


def test_attribute_and_sequence_keys():
  names = flatten_dotted({"pair": _Pair(jnp.zeros(1), jnp.ones(1))})
  assert sorted(names) == ["pair.left", "pair.right"]
  # optax states: a tuple of named tuples holding copies of the params tree.
  opt_state = optax.adam(1e-3).init({"w": jnp.zeros(2)})
  assert sorted(flatten_dotted(opt_state)) == ["0.count", "0.mu.w", "0.nu.w"]
  assert path_keys(("a", 0)) == ("a", "0")
