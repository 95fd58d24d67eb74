"""Linear probe: a softmax classifier trained on frozen features (e.g. latents), top-1/top-5.

Features of any shape (N, ...) are flattened (`pool='flatten'`) or averaged over every axis
between the first and the last (`pool='mean'`, e.g. (N, 16, 16, 96) -> (N, 96)), standardised
with the training set's per-dimension mean/std (like MAE's BatchNorm-without-affine probe head),
then a linear layer is trained with AdamW on the cross-entropy, full-batch or in shuffled
minibatches, entirely inside one jitted loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from psvae_jax.metrics.precision import full_precision

POOLS = ("flatten", "mean")


def probe_features(features: np.ndarray, pool: str = "flatten") -> np.ndarray:
  """(N, ...) -> (N, D) float32 by flattening or mean-pooling the middle axes."""
  f = np.asarray(features, np.float32)
  if pool == "flatten":
    return f.reshape(f.shape[0], -1)
  if pool == "mean":
    return f.reshape(f.shape[0], -1, f.shape[-1]).mean(axis=1) if f.ndim > 2 else f
  raise ValueError(f"unknown pool {pool!r}; expected one of {POOLS}")


def topk_accuracy(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Fraction of rows whose label is among the k largest logits."""
  k = min(k, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  return jnp.mean(jnp.any(top == labels[:, None], axis=-1))


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray, *, num_classes: int,
                 pool: str = "flatten", epochs: int = 100, batch_size: int | None = None,
                 learning_rate: float = 1e-3, weight_decay: float = 1e-4,
                 seed: int = 0) -> dict[str, float]:
  """Trains a linear classifier on `train_*` and reports accuracy on `test_*`.

  Args:
    train_features, test_features: (N, ...) frozen features.
    train_labels, test_labels: (N,) integer labels in [0, num_classes).
    pool: 'flatten' or 'mean' (see `probe_features`).
    epochs: passes over the training set.
    batch_size: minibatch size (the last partial batch of each epoch is dropped); None =
      full batch.
  Returns:
    {'top1', 'top5', 'train_top1', 'final_loss'} (top5 is top-min(5, num_classes)).
  """
  x_train = probe_features(train_features, pool)
  x_test = probe_features(test_features, pool)
  y_train = np.asarray(train_labels, np.int32)
  y_test = np.asarray(test_labels, np.int32)
  for name, y, x in (("train", y_train, x_train), ("test", y_test, x_test)):
    if y.shape != (x.shape[0],):
      raise ValueError(f"{name} labels {y.shape} do not match {x.shape[0]} features")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise ValueError(f"{name} labels must be in [0, {num_classes})")
  mean = x_train.mean(axis=0)
  std = x_train.std(axis=0) + 1e-6
  x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

  n, dim = x_train.shape
  batch = n if batch_size is None else min(int(batch_size), n)
  steps_per_epoch = n // batch
  optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
  params = {"w": jnp.zeros((dim, num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}

  def loss_fn(p, x, y):
    logits = x @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  @full_precision
  def train(params, x, y, key):
    opt_state = optimizer.init(params)

    def step(carry, idx):
      p, s = carry
      loss, grads = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
      updates, s = optimizer.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), loss

    def epoch(carry, k):
      order = jax.random.permutation(k, n)[:steps_per_epoch * batch]
      carry, losses = jax.lax.scan(step, carry, order.reshape(steps_per_epoch, batch))
      return carry, losses[-1]

    (params, _), losses = jax.lax.scan(epoch, (params, opt_state),
                                       jax.random.split(key, epochs))
    return params, losses[-1]

  params, final_loss = train(params, jnp.asarray(x_train), jnp.asarray(y_train),
                             jax.random.key(seed))
  logits = jax.jit(full_precision(lambda x: x @ params["w"] + params["b"]))
  logits_test, logits_train = logits(jnp.asarray(x_test)), logits(jnp.asarray(x_train))
  return {"top1": float(topk_accuracy(logits_test, jnp.asarray(y_test), 1)),
          "top5": float(topk_accuracy(logits_test, jnp.asarray(y_test), 5)),
          "train_top1": float(topk_accuracy(logits_train, jnp.asarray(y_train), 1)),
          "final_loss": float(final_loss)}
