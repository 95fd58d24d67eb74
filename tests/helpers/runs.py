"""Tiny finished runs' workdirs (T2I, edit, PS-VAE), written as finished runs leave them
(config, state, EMA, latent statistics) from the tasks' own layouts with random host-side
values: compiling a training step here would dominate the tool tests that only read a run.
`read_run` reads a run back with the project's own Checkpointer."""
import jax
import numpy as np

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import sharding
from psvae_jax import train_state as ts
from psvae_jax.config_base import to_json
from psvae_jax.config_loader import load_config, set_by_path
from psvae_jax.tasks import get_task

STEP = 3


def tiny_t2i_config(**overrides):
  """configs/t2i.py:smoke with the smallest autoencoder that decodes a 4x4 latent to 64 px."""
  config = load_config("configs/t2i.py:smoke")
  ae = config.model.autoencoder
  ae.svae_depth = 1
  ae.latent_channels = 8
  ae.pixel_decoder.ch = 8
  ae.pixel_decoder.ch_mult = (1, 1, 1, 1, 1)  # 4x4 -> 64x64
  ae.pixel_decoder.num_res_blocks = 0
  ae.pixel_decoder.attn_resolutions = ()
  ae.pixel_decoder.norm_groups = 4
  config.model.ddt_head = False
  config.model.max_text_len = 48
  config.model.require_autoencoder = False
  config.data.source = "synthetic:single"
  config.data.synthetic_size = 64
  config.data.eval_size = 16
  config.batch_size = 8
  config.flow.sample_steps = 2
  config.logging.tensorboard = False
  for key, value in overrides.items():
    set_by_path(config, key, value)
  return config


def write_t2i_run(workdir: str, **overrides):
  """Writes the run's checkpoint at STEP; returns its config."""
  config = tiny_t2i_config(**overrides)
  write_run(workdir, config)
  return config


def write_psvae_run(workdir: str):
  """A tiny PS-VAE run (the shrunk S-VAE shapes, task psvae); returns its config."""
  from helpers.configs import tiny_svae_config

  config = tiny_svae_config()
  config.task = "psvae"
  write_run(workdir, config)
  return config


def write_run(workdir: str, config, *, step: int = STEP, seed: int = 0) -> tuple[dict, dict]:
  """Writes a checkpoint at `step` of `config`'s task with random values and latent statistics
  for config.model.autoencoder (T2I, edit) or config.model (PS-VAE). Returns the trainable +
  frozen parameters and the EMA written, as host pure dicts."""
  task = get_task(config)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  rng = np.random.default_rng(seed)
  fill = lambda a: jax.device_put(
      (0.05 * rng.standard_normal(a.shape)).astype(a.dtype), a.sharding)
  channels = config.model.get("autoencoder", config.model).latent_channels
  stats = {"mean": [0.1 * i for i in range(channels)],
           "std": [0.5 + 0.1 * i for i in range(channels)]}
  with jax.set_mesh(mesh):
    layout = ts.make_train_setup(task, config, mesh)
    state = jax.tree.map(fill, layout.abstract_state)
    ema = jax.tree.map(fill, layout.abstract_ema)
    writer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), async_save=False)
    writer.save(step, state=state, ema=ema, config_json=to_json(config),
                extras={"latent_stats": stats})
    writer.close()
  return (jax.device_get(ts.all_params(state).to_pure_dict()),
          jax.device_get(ema.to_pure_dict()))


def read_run(workdir: str, config, mesh=None) -> tuple[int, dict]:
  """(latest step, {'state': ..., 'ema': ..., 'extras': ...} as host arrays) of a run of
  `config`, read with the project's own Checkpointer from the task's layout onto `mesh`
  (default: one device)."""
  task = get_task(config)
  mesh = mesh or sharding.make_mesh({"data": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    layout = ts.make_train_setup(task, config, mesh)
    reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), create=False)
    try:
      step = reader.latest_step()
      restored = reader.restore(step, abstract_state=layout.abstract_state,
                                abstract_ema=layout.abstract_ema)
    finally:
      reader.close()
  return step, jax.device_get(restored)

