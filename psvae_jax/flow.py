"""Rectified-flow maths for the generators: the noising path, the velocity target, training
timestep sampling with a resolution shift, and an Euler sampler with classifier-free guidance.

Convention (SD3 / rectified flow), t = 0 is data and t = 1 is pure noise:
  x_t = (1 - t) x0 + t eps,        v = d x_t / d t = eps - x0.
A model predicts v(x_t, t); sampling integrates dx/dt = v from t = 1 down to t = 0.
Models that follow diffusers (`psvae_jax.models.mmdit.MMDiT`) take timesteps as t * 1000; the
functions here always use t in [0, 1].

Guidance with several conditions (e.g. editing: source image and instruction) chains the
conditions one at a time, as InstructPix2Pix does. With velocities v_0 (no condition),
v_1 (first condition), ..., v_K (all K conditions) and scales s_1..s_K:
  v = v_0 + sum_k s_k (v_k - v_{k-1}).
K = 1 is ordinary classifier-free guidance, v = v_uncond + s (v_cond - v_uncond). For editing,
ordering the chain (nothing, +source image, +text) gives
  v = v(-, -) + s_img (v(img, -) - v(-, -)) + s_txt (v(img, txt) - v(img, -)).
All scales 1 give the fully conditioned v_K.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def _per_example(t: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a (batch,) time to broadcast against x (batch, ...); scalars pass through."""
  t = jnp.asarray(t, dtype=x.dtype)
  if t.ndim == 0:
    return t
  if t.shape != x.shape[:1]:
    raise ValueError(f"t has shape {t.shape}; expected () or ({x.shape[0]},) for x {x.shape}")
  return t.reshape(t.shape + (1,) * (x.ndim - 1))


def noisy_latents(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t) x0 + t noise, with t () or (batch,)."""
  t = _per_example(t, x0)
  return (1 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The regression target of the velocity model: v = noise - x0."""
  return noise - x0


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  """Resolution shift t' = s t / (1 + (s - 1) t): s > 1 moves time toward the noise end."""
  return shift * t / (1 + (shift - 1) * t)


def resolution_shift(channels: int, patch_size: int) -> float:
  """The paper's training shift s = sqrt(C P^2 / 16) (96 channels, P = 1 -> 2.449)."""
  return math.sqrt(channels * patch_size ** 2 / 16)


def sample_timesteps(rng: jax.Array, batch: int, *, shift: float = 1.0, mean: float = 0.0,
                     std: float = 1.0, dtype=jnp.float32) -> jax.Array:
  """Training times: logit-normal t = sigmoid(N(mean, std^2)), then `shift_time`. (batch,)."""
  t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,), jnp.float32))
  return shift_time(t, shift).astype(dtype)


def caption_dropout_mask(rng: jax.Array, batch: int, p: float = 0.1) -> jax.Array:
  """Boolean (batch,): True where the caption is dropped (replaced by the empty condition)."""
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"caption dropout probability must be in [0, 1], got {p}")
  return jax.random.uniform(rng, (batch,)) < p


def sampling_times(num_steps: int, shift: float = 1.0) -> jax.Array:
  """(num_steps + 1,) float32 times from 1 to 0: a uniform grid passed through `shift_time`."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  return shift_time(jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32), shift)


def guidance_combine(velocities: jax.Array, scales: jax.Array) -> jax.Array:
  """Chained classifier-free guidance: v_0 + sum_k s_k (v_k - v_{k-1}).

  Args:
    velocities: (K + 1, batch, ...): v_0 unconditional, v_k with the first k conditions.
    scales: (K,) guidance scales s_1..s_K (a scalar is allowed when K = 1).
  """
  scales = jnp.atleast_1d(jnp.asarray(scales, jnp.float32))
  num = velocities.shape[0] - 1
  if scales.shape != (num,):
    raise ValueError(f"{num + 1} velocity groups need {num} guidance scales, got shape "
                     f"{scales.shape}")
  steps = velocities[1:] - velocities[:-1]
  scales = scales.reshape((num,) + (1,) * (velocities.ndim - 1)).astype(velocities.dtype)
  return velocities[0] + jnp.sum(scales * steps, axis=0)


def euler_sample(velocity_fn: VelocityFn, noise: jax.Array, *, num_steps: int = 50,
                 shift: float = 3.0, guidance_scale: float | Sequence[float] | jax.Array | None
                 = None, guidance_interval: tuple[float, float] | None = None) -> jax.Array:
  """Integrates dx/dt = v(x, t) from t = 1 (x = noise) to t = 0 with Euler steps.

  Times follow `sampling_times(num_steps, shift)`. Guidance evaluates every condition group in
  ONE batched call per step:
    guidance_scale None: `velocity_fn(x, t)` with x (batch, ...) and t (batch,).
    a scalar s: classifier-free guidance; `velocity_fn` receives x and t tiled to 2 * batch,
      the first half for the unconditional and the second for the conditional velocity (the
      caller's function closes over conditioning stacked in that order) and returns (2 * batch,
      ...); they combine as v_u + s (v_c - v_u).
    K scales: K + 1 groups, ordered (no condition, +condition 1, ..., +condition K), combined
      with `guidance_combine`.
  guidance_interval=(lo, hi) applies guidance only for lo <= t <= hi; elsewhere the fully
  conditioned velocity is used. Jit-friendly: the loop is a `lax.fori_loop`; scales may be traced.

  Returns the sample at t = 0, in noise's dtype.
  """
  times = sampling_times(num_steps, shift)
  batch = noise.shape[0]
  if guidance_scale is None:
    groups, scales = 1, None
  else:
    scales = jnp.atleast_1d(jnp.asarray(guidance_scale, jnp.float32))
    if scales.ndim != 1:
      raise ValueError(f"guidance_scale must be a scalar or a 1-D sequence, got shape "
                       f"{scales.shape}")
    groups = scales.shape[0] + 1

  def velocity(x, t):
    t_batch = jnp.full((batch * groups,), t, jnp.float32)
    xs = jnp.concatenate([x] * groups, axis=0) if groups > 1 else x
    v = velocity_fn(xs, t_batch)
    if v.shape != xs.shape:
      raise ValueError(f"velocity_fn returned shape {v.shape} for input {xs.shape}")
    v = v.astype(x.dtype)
    if groups == 1:
      return v
    step_scales = scales
    if guidance_interval is not None:
      lo, hi = guidance_interval
      step_scales = jnp.where((t >= lo) & (t <= hi), scales, jnp.ones_like(scales))
    return guidance_combine(v.reshape((groups, batch) + x.shape[1:]), step_scales)

  def step(i, x):
    t, t_next = times[i], times[i + 1]
    return x + (t_next - t).astype(x.dtype) * velocity(x, t)

  return jax.lax.fori_loop(0, num_steps, step, noise)
