"""Rectified-flow maths against closed forms (Gaussian data, straight-line fields)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psvae_jax import flow

MU, SIGMA = 1.5, 0.5


def optimal_velocity(x, t):
  """E[eps - x0 | x_t] for x0 ~ N(MU, SIGMA^2 I), eps ~ N(0, I), x_t = (1-t) x0 + t eps."""
  t = t.reshape(t.shape + (1,) * (x.ndim - 1))
  var = (1 - t) ** 2 * SIGMA ** 2 + t ** 2
  return (t - (1 - t) * SIGMA ** 2) / var * (x - (1 - t) * MU) - MU


def test_path_and_target():
  x0, noise = jnp.full((2, 3), 2.0), jnp.full((2, 3), -1.0)
  t = jnp.array([0.0, 0.25])
  xt = flow.noisy_latents(x0, noise, t)
  np.testing.assert_allclose(xt[0], 2.0)
  np.testing.assert_allclose(xt[1], 0.75 * 2.0 - 0.25)
  np.testing.assert_allclose(flow.noisy_latents(x0, noise, 1.0), noise)
  np.testing.assert_allclose(flow.velocity_target(x0, noise), -3.0)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_least_squares_minimiser_is_the_analytic_velocity(t):
  # The MSE-optimal predictor of v = eps - x0 given x_t is linear in x_t for Gaussian data:
  # least squares over samples recovers the analytic slope and intercept.
  k0, k1 = jax.random.split(jax.random.key(0))
  n = 200_000
  x0 = MU + SIGMA * jax.random.normal(k0, (n,))
  noise = jax.random.normal(k1, (n,))
  xt = np.asarray(flow.noisy_latents(x0, noise, t))
  target = np.asarray(flow.velocity_target(x0, noise))
  design = np.stack([xt, np.ones_like(xt)], axis=1)
  (slope, intercept), *_ = np.linalg.lstsq(design, target, rcond=None)
  var = (1 - t) ** 2 * SIGMA ** 2 + t ** 2
  want_slope = (t - (1 - t) * SIGMA ** 2) / var
  want_intercept = -want_slope * (1 - t) * MU - MU
  assert abs(slope - want_slope) < 0.02
  assert abs(intercept - want_intercept) < 0.02


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_on_optimal_velocity_maps_noise_to_data_distribution(shift):
  # The probability-flow ODE of Gaussian data is affine: noise z ends at MU + SIGMA z.
  z = jax.random.normal(jax.random.key(1), (4096, 2))
  x = flow.euler_sample(optimal_velocity, z, num_steps=1000, shift=shift)
  np.testing.assert_allclose(x, MU + SIGMA * z, atol=1e-2)
  assert abs(float(x.mean()) - MU) < 0.03
  assert abs(float(x.std()) - SIGMA) < 0.02


@pytest.mark.parametrize("num_steps,shift", [(1, 1.0), (5, 3.0), (7, 0.5)])
def test_euler_is_exact_on_a_straight_line_field(num_steps, shift):
  # v(x, t) = (x - c) / t is the velocity of x_t = (1 - t) c + t z; Euler stays on the line
  # for any time grid and lands on c.
  c = jnp.array([[3.0, -2.0, 0.5]])
  z = jax.random.normal(jax.random.key(2), (8, 3))
  fn = lambda x, t: (x - c) / t[:, None]
  x = flow.euler_sample(fn, z, num_steps=num_steps, shift=shift)
  np.testing.assert_allclose(x, jnp.broadcast_to(c, z.shape), atol=1e-5)


def test_euler_on_linear_ode():
  z = jnp.ones((2, 2))
  x = flow.euler_sample(lambda x, t: 0.7 * x, z, num_steps=4000, shift=1.0)
  np.testing.assert_allclose(x, math.exp(-0.7), rtol=2e-4)


def test_shifts_and_schedule():
  assert abs(flow.resolution_shift(96, 1) - 2.449) < 1e-3
  assert flow.resolution_shift(16, 1) == 1.0
  np.testing.assert_allclose(flow.shift_time(jnp.array([0.0, 0.5, 1.0]), 3.0), [0, 0.75, 1])
  times = flow.sampling_times(10, 3.0)
  assert times.shape == (11,) and times[0] == 1.0 and times[-1] == 0.0
  assert bool(jnp.all(jnp.diff(times) < 0))
  t = flow.sample_timesteps(jax.random.key(3), 20_000, shift=3.0)
  assert t.shape == (20_000,) and bool(jnp.all((t > 0) & (t < 1)))
  # The median of sigmoid(N(0,1)) is 1/2, so the shifted median is shift_time(1/2) = 0.75.
  assert abs(float(jnp.median(t)) - 0.75) < 0.01


def test_caption_dropout_mask():
  drop = flow.caption_dropout_mask(jax.random.key(4), 20_000, 0.1)
  assert drop.dtype == jnp.bool_ and abs(float(drop.mean()) - 0.1) < 0.01
  assert not bool(flow.caption_dropout_mask(jax.random.key(4), 10, 0.0).any())
  assert bool(flow.caption_dropout_mask(jax.random.key(4), 10, 1.0).all())
  with pytest.raises(ValueError):
    flow.caption_dropout_mask(jax.random.key(4), 10, 1.5)


def _grouped_fn(weights, seen):
  """Velocity w_g * x for group g; records the batch size of every call."""

  def fn(x, t):
    seen.append(x.shape[0])
    groups = len(weights)
    w = jnp.repeat(jnp.asarray(weights), x.shape[0] // groups)
    return w[:, None] * x

  return fn


def test_cfg_scale_one_equals_conditional_and_is_one_batched_call():
  z = jax.random.normal(jax.random.key(5), (3, 4))
  seen = []
  guided = flow.euler_sample(_grouped_fn([0.2, 0.9], seen), z, num_steps=6,
                             guidance_scale=1.0)
  cond = flow.euler_sample(_grouped_fn([0.9], []), z, num_steps=6)
  np.testing.assert_allclose(guided, cond, rtol=1e-6)
  assert seen == [6]  # one call (traced once in the loop) on the stacked (uncond, cond) batch
  # Scale 0 is the unconditional model, and s > 1 extrapolates: v = (0.2 + s * 0.7) x.
  uncond = flow.euler_sample(_grouped_fn([0.2, 0.9], []), z, num_steps=6, guidance_scale=0.0)
  np.testing.assert_allclose(uncond, flow.euler_sample(_grouped_fn([0.2], []), z, num_steps=6),
                             rtol=1e-6)
  strong = flow.euler_sample(_grouped_fn([0.2, 0.9], []), z, num_steps=6, guidance_scale=3.0)
  np.testing.assert_allclose(strong, flow.euler_sample(_grouped_fn([2.3], []), z, num_steps=6),
                             rtol=1e-5)


def test_multi_condition_guidance_formula():
  keys = jax.random.split(jax.random.key(6), 3)
  v_none, v_img, v_full = (jax.random.normal(k, (2, 5)) for k in keys)
  s_img, s_txt = 1.5, 4.0
  got = flow.guidance_combine(jnp.stack([v_none, v_img, v_full]), jnp.array([s_img, s_txt]))
  want = v_none + s_img * (v_img - v_none) + s_txt * (v_full - v_img)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(flow.guidance_combine(jnp.stack([v_none, v_img, v_full]),
                                                   jnp.ones(2)), v_full, atol=1e-6)
  with pytest.raises(ValueError):
    flow.guidance_combine(jnp.stack([v_none, v_img, v_full]), jnp.ones(3))
  # In the sampler: three groups, all scales 1 -> the fully conditioned velocity.
  z = jnp.ones((2, 5))
  seen = []
  x = flow.euler_sample(_grouped_fn([0.1, 0.4, 0.8], seen), z, num_steps=3,
                        guidance_scale=(1.0, 1.0))
  np.testing.assert_allclose(x, flow.euler_sample(_grouped_fn([0.8], []), z, num_steps=3),
                             rtol=1e-6)
  assert seen == [6]


def test_guidance_interval_and_jit_with_traced_scale():
  z = jax.random.normal(jax.random.key(7), (2, 3))
  fn = _grouped_fn([0.2, 0.9], [])

  @jax.jit
  def sample(z, scale):
    return flow.euler_sample(fn, z, num_steps=8, guidance_scale=scale,
                             guidance_interval=(2.0, 3.0))

  # The interval excludes every step, so guidance is off: the conditional flow.
  np.testing.assert_allclose(sample(z, 5.0), flow.euler_sample(_grouped_fn([0.9], []), z,
                                                                num_steps=8), rtol=1e-5)
  full = jax.jit(lambda z, s: flow.euler_sample(fn, z, num_steps=8, guidance_scale=s))
  np.testing.assert_allclose(full(z, 3.0), flow.euler_sample(_grouped_fn([2.3], []), z,
                                                             num_steps=8), rtol=1e-5)
