"""Editing stage: source tokens stay clean and carry no loss, condition dropout, two-scale
guidance, text-to-image sampling from the edit model, initialisation from a T2I run."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psvae_jax import runs, sharding
from psvae_jax import train as train_lib
from psvae_jax import train_state as ts
from psvae_jax.config_base import ConfigError
from psvae_jax.config_loader import load_config
from psvae_jax.data import synthetic
from psvae_jax.data.errors import DataError
from psvae_jax.models import mmdit
from psvae_jax.tasks import edit, get_task
from psvae_jax.tokenizers import tokenize

from helpers.configs import tiny_edit_config, tiny_generator_config
from helpers.runs import write_run

ONE_DEVICE = jax.devices()[:1]


def tiny_t2i_config(**overrides):
  """configs/t2i.py:smoke with the same tiny model as `tiny_edit_config`."""
  return tiny_generator_config(load_config("configs/t2i.py:smoke"),
                               **{"model.require_autoencoder": False, **overrides})


def random_model(task, seed: int = 0):
  """The task's model with random parameters (zero-init layers made non-zero), filled from
  NumPy on the abstract model: building it eagerly costs many small compiles."""
  abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  values = jax.tree.map(
      lambda a: (0.2 * rng.standard_normal(a.shape)).astype(a.dtype)
      if jnp.issubdtype(a.dtype, jnp.floating) else np.zeros(a.shape, a.dtype),
      state.to_pure_dict())
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def jit_call(model, fn, *args):
  """fn(model, *args) under jax.jit (the model passes as its split state)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))(state, *args)


def edit_batch(task, n: int = 2) -> dict:
  """A prepared batch of `n` synthetic edits at the task's image size."""
  size = task.config.data.image_size
  raw = [synthetic.edits_example(i, size) for i in range(n)]
  return task.prepare_batch({k: np.stack([r[k] for r in raw]) if k.endswith("image")
                             else np.array([r[k] for r in raw], dtype=object)
                             for k in ("image", "source_image", "instruction")})


@pytest.fixture(scope="module")
def task_and_model():
  task = get_task(tiny_edit_config())
  return task, random_model(task)


def test_source_is_clean_and_carries_no_loss(task_and_model, monkeypatch):
  task, model = task_and_model
  batch = edit_batch(task)
  noise = jax.random.normal(jax.random.key(0), (2, task.grid, task.grid,
                                                 task.generator.in_channels))
  t = jnp.array([0.3, 0.8])
  tokens = task.grid ** 2
  velocity, run_blocks = mmdit.MMDiT.velocity, mmdit.MMDiT._run_blocks

  def loss_and_inputs(model, batch, delta):
    """The edit loss with `delta` added to the image stream's final outputs, and what the
    generator received."""
    seen = {}

    def spy(self, x_t, t_, *args, **kwargs):
      seen.update(x_t=x_t, source=kwargs["source_latents"])
      return velocity(self, x_t, t_, *args, **kwargs)

    monkeypatch.setattr(mmdit.MMDiT, "velocity", spy)
    monkeypatch.setattr(mmdit.MMDiT, "_run_blocks", lambda *a: run_blocks(*a) + delta)
    x0, source = task._target_and_source(model, batch)
    states, mask = task.text_condition(model, batch)
    loss = jnp.mean(edit.edit_loss_per_example(model, x0, source, noise, t, states, mask))
    monkeypatch.undo()
    return loss, (seen, x0, task.source_latents(model, batch))

  def grad_fn(model, batch, delta):
    return jax.grad(loss_and_inputs, argnums=2, has_aux=True)(model, batch, delta)

  delta = jnp.zeros((2, 2 * tokens, model.generator.config.width))
  grad, (seen, x0, source) = jax.device_get(jit_call(model, grad_fn, batch, delta))
  # The generator receives the clean source latents and the noisy TARGET latents.
  np.testing.assert_allclose(seen["source"], source, rtol=1e-5, atol=1e-4)
  tt = np.asarray(t)[:, None, None, None]
  np.testing.assert_allclose(seen["x_t"], (1 - tt) * x0 + tt * np.asarray(noise), rtol=1e-5,
                             atol=1e-4)
  # Only the target positions of the image stream move the loss.
  assert np.abs(grad[:, :tokens]).max() > 0
  assert np.abs(grad[:, tokens:]).max() == 0


def test_condition_dropout_rates():
  drop_text, drop_source = jax.device_get(
      edit.condition_dropout(jax.random.key(1), 40_000, 0.1, 0.2, 0.3))
  only_text = np.mean(drop_text & ~drop_source)
  only_source = np.mean(drop_source & ~drop_text)
  both = np.mean(drop_text & drop_source)
  np.testing.assert_allclose([only_text, only_source, both], [0.1, 0.2, 0.3], atol=0.01)
  with pytest.raises(ConfigError, match="sum to <= 1"):
    get_task(tiny_edit_config(**{"flow.source_dropout": 0.6, "flow.joint_dropout": 0.5}))


def test_two_scale_guidance(task_and_model):
  task, model = task_and_model
  batch = edit_batch(task)
  x = jax.random.normal(jax.random.key(2), (2, task.grid, task.grid,
                                             task.generator.in_channels))
  t = jnp.array([0.4, 0.9])

  def velocities(model, batch, x):
    source = task.source_latents(model, batch)
    states, mask = task.text_condition(model, batch)
    empty_states, empty_mask = task.empty_text(model)
    cond = (model, x, t, states, mask, empty_states, empty_mask, source)
    e_states = jnp.broadcast_to(empty_states, states.shape)
    e_mask = jnp.broadcast_to(empty_mask, mask.shape)
    return {
        "plain": edit.edit_velocity(model, x, t, states, mask, source),
        "none": edit.edit_velocity(model, x, t, e_states, e_mask, source, jnp.zeros((2,), bool)),
        "img": edit.edit_velocity(model, x, t, e_states, e_mask, source),
        "full_1_1": edit.guided_velocity(*cond, text_scale=1.0, image_scale=1.0, minimal=False),
        "two_3": edit.guided_velocity(*cond, text_scale=3.0, image_scale=1.0),
        "full_3": edit.guided_velocity(*cond, text_scale=3.0, image_scale=1.0, minimal=False),
        "general": edit.guided_velocity(*cond, text_scale=4.0, image_scale=1.5),
    }

  v = jax.device_get(jit_call(model, velocities, batch, x))
  assert np.abs(v["plain"]).max() > 1e-3
  # Scales 1: the full three-group formula is the plain conditional velocity.
  np.testing.assert_allclose(v["full_1_1"], v["plain"], atol=1e-4)
  # Image scale 1: text guidance with the source (two groups) equals the full formula.
  np.testing.assert_allclose(v["two_3"], v["full_3"], atol=1e-4)
  # General scales: v(-,-) + s_img (v(src,-) - v(-,-)) + s_txt (v(src,txt) - v(src,-)).
  want = v["none"] + 1.5 * (v["img"] - v["none"]) + 4.0 * (v["plain"] - v["img"])
  np.testing.assert_allclose(v["general"], want, atol=1e-4)
  assert np.abs(v["img"] - v["none"]).max() > 1e-3  # the source matters


def test_text_to_image_from_the_edit_model(task_and_model):
  task, model = task_and_model
  captions = np.array(["a red circle", "two blue squares"], dtype=object)
  ids, mask = tokenize(task.tokenizer, captions, task.config.model.max_text_len)
  batch = {"input_ids": ids, "attention_mask": mask}
  x = jax.random.normal(jax.random.key(3), (2, task.grid, task.grid, task.generator.in_channels))
  t = jnp.array([0.5, 0.5])

  def run(model, batch, x):
    states, mask = task.text_condition(model, batch)
    no_source = model.generator.velocity(x, t, states, mmdit.mean_pool(states, mask),
                                         text_mask=mask)
    hidden = edit.edit_velocity(model, x, t, states, mask, jnp.ones_like(x),
                                jnp.zeros((2,), bool))
    return no_source, hidden, task.generate(model, batch, jax.random.key(0))

  no_source, hidden, images = jax.device_get(jit_call(model, run, batch, x))
  # Without a source the edit model is a T2I model: a hidden source changes nothing.
  np.testing.assert_allclose(hidden, no_source, atol=1e-5)
  assert np.abs(no_source).max() > 1e-3
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_prepare_batch_needs_edit_triplets(task_and_model):
  task, _ = task_and_model
  with pytest.raises(DataError, match=r"no \['source_image', 'instruction'\]"):
    task.prepare_batch({"image": np.zeros((1, 32, 32, 3), np.uint8),
                        "caption": np.array(["a red circle"], dtype=object)})
  batch = edit_batch(task, 3)
  assert set(batch) == {"image", "source_image", "input_ids", "attention_mask"}
  assert batch["input_ids"].shape == (3, 24)


def test_trainable_text_encoder(task_and_model):
  task, model = task_and_model
  mesh = sharding.make_mesh({"data": 1}, ONE_DEVICE)
  batch = edit_batch(task)
  for train in (False, True):
    config = tiny_edit_config(**{"model.train_text_encoder": train})
    trainable = get_task(config)
    layout = ts.make_train_setup(trainable, config, mesh)
    assert ("text_encoder" in layout.abstract_state["params"]) == train
    assert "generator" in layout.abstract_state["params"]

    graphdef, params, rest = nnx.split(model.text_encoder, nnx.Param, ...)

    def states_sum(params, batch, trainable=trainable):
      text_only = types.SimpleNamespace(text_encoder=nnx.merge(graphdef, params, rest))
      return jnp.sum(trainable.text_condition(text_only, batch)[0])

    grads = jax.jit(jax.grad(states_sum))(params, batch)
    moved = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    assert (moved > 0) == train  # frozen: stop_gradient; trained: the states carry gradient


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
  """(workdir, config, written params, written EMA) of a fake finished T2I run."""
  workdir = str(tmp_path_factory.mktemp("t2i"))
  params, ema = write_run(workdir, tiny_t2i_config(), step=5)
  return workdir, tiny_t2i_config(), params, ema


def test_init_from_a_t2i_run(t2i_run):
  t2i_dir, _, t2i_params, t2i_ema = t2i_run
  config = tiny_edit_config(init=t2i_dir, **{"model.edit_position_std": 0.5})
  task = get_task(config)
  mesh = sharding.make_mesh({"data": 1}, ONE_DEVICE)
  with jax.set_mesh(mesh):
    layout = ts.make_train_setup(task, config, mesh)
    abstract = layout.abstract_state
    params = ts.all_params({k: jax.tree.map(lambda a: jax.device_put(
        np.full(a.shape, 0.01, a.dtype), a.sharding), abstract[k]) for k in ("params", "frozen")})
    loaded = jax.device_get(runs.init_params(task, params, t2i_dir, mesh).to_pure_dict())
  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  generator = dict(loaded["generator"])
  # The new source embedding and cell codes keep their initial values; everything else is the
  # T2I run's (the generator from its EMA, not its raw parameters).
  np.testing.assert_array_equal(generator.pop("source_embedding"), np.float32(0.01))
  np.testing.assert_array_equal(generator.pop("edit_positions"), np.float32(0.01))
  assert same(generator, t2i_ema["generator"])
  assert not same(generator, t2i_params["generator"])
  for group in edit._FROM_T2I[1:]:
    assert same(loaded[group], t2i_params[group]), group


def test_init_checks_the_t2i_run(t2i_run, tmp_path):
  t2i_dir = t2i_run[0]
  mesh = sharding.make_mesh({"data": 1}, ONE_DEVICE)
  config = tiny_edit_config(**{"model.qk_norm": "", "model.generator": "small"})
  with pytest.raises(ConfigError, match=r"generator='small' but the run has 'tiny'.*"
                                        r"qk_norm='' but the run has 'rms_norm'"):
    runs.init_from_parent(get_task(config), None, t2i_dir, mesh)
  other = str(tmp_path / "edit")
  write_run(other, tiny_edit_config())
  with pytest.raises(ConfigError, match="is a 'edit' run; this stage starts from a 't2i' run"):
    runs.init_from_parent(get_task(tiny_edit_config()), None, other, mesh)
  with pytest.raises(ConfigError, match="config.init is empty: editing starts from a T2I run"):
    get_task(tiny_edit_config(**{"model.require_init": True})).check_fresh_start()


@pytest.mark.slow
def test_edit_training_from_a_t2i_run(t2i_run, tmp_path):
  """Two training steps from the T2I run, eval and the (source | edited | target) samples."""
  t2i_dir = t2i_run[0]
  workdir = str(tmp_path / "edit")
  summary = train_lib.train(tiny_edit_config(init=t2i_dir), workdir, devices=ONE_DEVICE)
  assert summary["source"] == f"init {t2i_dir}"
  assert np.isfinite(summary["last_metrics"]["loss"])
  assert np.isfinite(summary["last_eval"]["eval/flow_loss_t0.5"])
  from PIL import Image
  grid = np.asarray(Image.open(f"{workdir}/samples/samples_0000002.png"))
  assert grid.shape == (32, 2 * 3 * 32 + 2, 3)  # 2 strips of 3 tiles side by side
