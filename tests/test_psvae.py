"""PS-VAE stage: init from an S-VAE run, what is frozen and what trains, latent statistics."""
import jax
import numpy as np

from psvae_jax import sharding
from psvae_jax import train as train_lib
from psvae_jax import train_state as ts
from psvae_jax.config_loader import set_by_path
from psvae_jax.tasks import get_task

from tools.t2i_run import read_run


def _params(config, workdir):
  step, restored = read_run(workdir, config, sharding.make_mesh(config.mesh))
  merged = ts.all_params(restored["state"]).to_pure_dict()
  return step, merged, restored.get("extras", {})


def _psvae_config(svae_config, svae_workdir):
  config = svae_config()
  config.task = "psvae"
  config.model.discriminator.enabled = True
  config.model.discriminator.ndf = 8
  config.loss.disc_start = 1  # GAN on from the second step
  config.loss.pixel_weight = 0.1
  config.total_steps = 2
  config.optim.ema_decay = 0.0
  with config.unlocked():
    config.latent_stats_batches = 2
  config.init = svae_workdir
  return config


def test_psvae_from_svae(tmp_path, svae_config):
  svae_dir = str(tmp_path / "svae")
  svae = svae_config(**{"total_steps": 2, "optim.ema_decay": 0.0})
  train_lib.train(svae, svae_dir)
  _, svae_params, _ = _params(svae, svae_dir)

  psvae_dir = str(tmp_path / "psvae")
  config = _psvae_config(svae_config, svae_dir)
  summary = train_lib.train(config, psvae_dir)
  assert summary["source"] == f"init {svae_dir}"
  # Logged means over steps 0 and 1: the discriminator is off at step 0, on from step 1.
  assert summary["last_metrics"]["disc_factor"] == 0.5 and "d_loss" in summary["last_metrics"]
  step, params, extras = _params(config, psvae_dir)
  assert step == 2

  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  # The teacher is the S-VAE's (pretrained) encoder and stays frozen.
  assert same(params["teacher"], svae_params["encoder"])
  # The encoder started from it and is now trained (pixel gradients reach it through z).
  assert not same(params["encoder"], svae_params["encoder"])
  assert not same(params["svae"], svae_params["svae"])
  # Latent statistics are saved with the final checkpoint, one entry per latent channel.
  stats = extras["latent_stats"]
  assert len(stats["mean"]) == len(stats["std"]) == config.model.latent_channels
  assert all(s > 0 for s in stats["std"])


def test_svae_pixel_decoder_does_not_touch_the_semantic_path(svae_config):
  """In the S-VAE the pixel loss sees stop_gradient(z): E_s gets no pixel gradient."""
  config = svae_config(**{"loss.semantic_weight": 0.0, "loss.kl_weight": 0.0})
  task = get_task(config)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  batch = {"image": np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)}
  with jax.set_mesh(mesh):
    layout = ts.make_train_setup(task, config, mesh)
    state = ts.init_state(task, config, layout)

    def loss(params):
      model = layout.merge(params, state["frozen"], state["other"])
      return task.loss(model, batch, jax.random.key(0), 0)[0]

    grads = jax.jit(jax.grad(loss))(state["params"])
  svae_grad = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads["svae"]))
  decoder_grad = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads["pixel_decoder"]))
  assert svae_grad == 0.0 and decoder_grad > 0.0
