"""A toy task (one linear layer on 32 px synthetic images) and its config: runs of the loop that
take seconds, for the checkpoint and crash tests."""
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from psvae_jax import config_base
from psvae_jax.config_loader import set_by_path
from psvae_jax.tasks.base import Task


class ToyTask(Task):
  """A linear map from pixels to 4 numbers; config.loss.nan_at_step injects a non-finite value."""

  def build_model(self, rngs):
    return nnx.Linear(32 * 32 * 3, 4, rngs=rngs)

  def prepare_batch(self, batch):
    return {"image": batch["image"]}

  def loss(self, model, batch, rng, step):
    x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32) / 255.0
    y = model(x)
    target = 0.5 + 0.01 * jax.random.normal(rng, y.shape)  # uses the step's RNG
    loss = jnp.mean((y - target) ** 2)
    at = step == self.config.loss.nan_at_step
    if self.config.loss.nan_in == "loss":
      loss = loss + jnp.where(at, jnp.nan, 0.0)
    else:  # a finite loss whose gradient is NaN: d sqrt(u) / du at u = 0 (inf), times 0
      u = jnp.where(at, jnp.sum(model.kernel.get_value()) * 0.0, 1.0)
      loss = loss + jnp.where(at, jnp.sqrt(u), 0.0)
    return loss, {}


# The entry for psvae_jax.tasks.TASKS under config.task='toy' (tests register it themselves).
TOY_TASK_ENTRY = ("helpers.toy_task", "ToyTask")


def toy_config(**overrides) -> ml_collections.ConfigDict:
  c = config_base.base_config("toy")
  c.loss = ml_collections.ConfigDict({"nan_at_step": -1, "nan_in": "loss"})
  c.data.source = "synthetic:shapes"
  c.data.image_size = 32
  c.data.synthetic_size = 64
  c.data.eval_size = 8
  c.data.read_threads = 1
  c.data.prefetch = 0
  c.batch_size = 8
  c.total_steps = 4
  c.log_every = 1
  c.eval_every = 0
  c.eval_batches = 1
  c.checkpoint_every = 2
  c.optim.lr = 1e-2
  c.optim.ema_decay = 0.5
  c.logging.tensorboard = False
  c.logging.peak_flops_per_device = 1e12
  for key, value in overrides.items():
    set_by_path(c, key, value)
  return c.lock()
