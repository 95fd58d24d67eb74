"""The paper's toy experiment (Sec. 3): flow matching on a 2-D manifold seen in 2-D and in 8-D.

  python -m psvae_jax.tools.toy_manifold [--steps=4000] [--out=toy_manifold.json] \
      [--png=toy_manifold.png]

Data: points along the strokes of the letters "PS" (a 2-D curve with a little Gaussian width),
and the same points embedded in 8-D by an orthonormal 8x2 matrix Q (x8 = Q x2): a 2-D manifold
in an 8-D space, the situation of an unregularised high-dimensional latent. One small MLP
velocity model (same widths, depth, optimiser, steps and batch) is trained with rectified flow
(`psvae_jax.flow`: x_t = (1 - t) x0 + t eps, v = eps - x0) on each, and sampled with Euler.

Metric: for every sample, the distance to its nearest data point, in the space the model lives
in (8-D samples against the embedded data in 8-D); reported as the mean over the worst 5% of
samples ('top-5% NN distance', the tail that shows samples off the manifold), with the mean NN
distance and, for 8-D, the mean norm of the samples' component orthogonal to the manifold's
plane (|| (I - Q Q^T) x ||). Expected: the 8-D model's top-5% distance is clearly larger than
the 2-D model's (its samples drift off the plane), which is why PS-VAE compresses encoder
features into a compact, regularised latent before generation. Runs in about a minute on a CPU.
"""
from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from psvae_jax import flow
from psvae_jax.tools import cli, files

AMBIENT_DIM = 8
TOP_FRACTION = 0.05


# --- data ------------------------------------------------------------------------------------

def _strokes() -> list[np.ndarray]:
  """Polylines (k, 2) tracing "P" and "S" (letter height 2, centred near the origin)."""
  arc = lambda cx, cy, r, a0, a1, n=64: np.stack(
      [cx + r * np.cos(np.linspace(a0, a1, n)), cy + r * np.sin(np.linspace(a0, a1, n))], 1)
  p_stem = np.array([[-1.6, -1.0], [-1.6, 1.0]])
  p_bowl = np.concatenate([[[-1.6, 1.0]], arc(-1.3, 0.5, 0.5, math.pi / 2, -math.pi / 2),
                           [[-1.6, 0.0]]])
  s_top = arc(0.9, 0.5, 0.5, math.pi / 6, 3 * math.pi / 2)
  s_bottom = arc(0.9, -0.5, 0.5, math.pi / 2, -5 * math.pi / 6)
  return [p_stem, p_bowl, s_top, s_bottom]


def ps_points(n: int, rng: np.random.Generator, noise: float = 0.03) -> np.ndarray:
  """n points spread uniformly by arc length along the "PS" strokes, plus N(0, noise^2)."""
  segments = np.concatenate([np.stack([s[:-1], s[1:]], 1) for s in _strokes()])  # (m, 2, 2)
  lengths = np.linalg.norm(segments[:, 1] - segments[:, 0], axis=-1)
  pick = rng.choice(len(segments), size=n, p=lengths / lengths.sum())
  u = rng.random((n, 1))
  points = segments[pick, 0] + u * (segments[pick, 1] - segments[pick, 0])
  return (points + noise * rng.standard_normal(points.shape)).astype(np.float32)


def embedding(rng: np.random.Generator, dim: int = AMBIENT_DIM) -> np.ndarray:
  """A random orthonormal (dim, 2) matrix Q."""
  q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
  return q.astype(np.float32)


# --- model and training ------------------------------------------------------------------------

def init_mlp(key: jax.Array, dim: int, hidden: int, depth: int, time_features: int):
  """Parameters of the velocity MLP: [x, time features] -> hidden x depth (SiLU) -> dim."""
  sizes = [dim + time_features] + [hidden] * depth + [dim]
  params = []
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    w = jax.random.normal(jax.random.fold_in(key, i), (a, b), jnp.float32) / math.sqrt(a)
    params.append({"w": w, "b": jnp.zeros((b,), jnp.float32)})
  return params


def _time_features(t: jax.Array, count: int) -> jax.Array:
  freqs = jnp.arange(1, count // 2 + 1, dtype=jnp.float32) * math.pi
  return jnp.concatenate([jnp.cos(t[:, None] * freqs), jnp.sin(t[:, None] * freqs)], axis=-1)


def mlp_velocity(params, x: jax.Array, t: jax.Array, time_features: int) -> jax.Array:
  h = jnp.concatenate([x, _time_features(t, time_features)], axis=-1)
  for layer in params[:-1]:
    h = jax.nn.silu(h @ layer["w"] + layer["b"])
  return h @ params[-1]["w"] + params[-1]["b"]


def train_flow(data: np.ndarray, *, steps: int, batch: int, hidden: int, depth: int,
               lr: float, seed: int, time_features: int = 16):
  """Trains the MLP with rectified flow on `data` (N, D); returns its parameters."""
  dim = data.shape[1]
  key = jax.random.key(seed)
  params = init_mlp(jax.random.fold_in(key, 0), dim, hidden, depth, time_features)
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=0.0)
  data = jnp.asarray(data)

  def loss_fn(params, rng):
    k_idx, k_t, k_eps = jax.random.split(rng, 3)
    x0 = data[jax.random.randint(k_idx, (batch,), 0, data.shape[0])]
    t = jax.random.uniform(k_t, (batch,))
    eps = jax.random.normal(k_eps, x0.shape)
    v = mlp_velocity(params, flow.noisy_latents(x0, eps, t), t, time_features)
    return jnp.mean(jnp.sum(jnp.square(v - flow.velocity_target(x0, eps)), axis=-1))

  def step(carry, i):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(key, i + 1))
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  run = jax.jit(lambda carry: jax.lax.scan(step, carry, jnp.arange(steps)))
  (params, _), losses = run((params, tx.init(params)))
  return params, np.asarray(losses)


def sample_flow(params, n: int, dim: int, *, sample_steps: int, seed: int,
                time_features: int = 16) -> np.ndarray:
  """n Euler samples (no time shift, no guidance) of the trained MLP."""
  noise = jax.random.normal(jax.random.key(seed), (n, dim), jnp.float32)
  fn = jax.jit(lambda p, z: flow.euler_sample(
      lambda x, t: mlp_velocity(p, x, t, time_features), z, num_steps=sample_steps, shift=1.0))
  return np.asarray(fn(params, noise))


# --- metric ------------------------------------------------------------------------------------

def nearest_distances(samples: np.ndarray, data: np.ndarray, chunk: int = 1024) -> np.ndarray:
  """Euclidean distance of each sample to its nearest data point (same dimension)."""
  data = np.asarray(data, np.float64)
  sq = np.sum(data ** 2, axis=1)
  out = []
  for start in range(0, len(samples), chunk):
    s = np.asarray(samples[start:start + chunk], np.float64)
    d2 = np.sum(s ** 2, axis=1)[:, None] + sq[None] - 2.0 * s @ data.T
    out.append(np.sqrt(np.maximum(d2.min(axis=1), 0.0)))
  return np.concatenate(out)


def top_fraction_mean(values: np.ndarray, fraction: float = TOP_FRACTION) -> float:
  """Mean of the largest `fraction` of `values` (at least one)."""
  k = max(1, int(round(fraction * len(values))))
  return float(np.mean(np.sort(values)[-k:]))


# --- the experiment ----------------------------------------------------------------------------

def run_experiment(*, steps: int = 4000, batch: int = 512, hidden: int = 256, depth: int = 3,
                   lr: float = 3e-3, num_data: int = 8000, num_samples: int = 4000,
                   sample_steps: int = 50, seed: int = 0) -> dict[str, Any]:
  """Trains and samples the 2-D and the 8-D model; returns the metrics (and the samples under
  '_samples' for plotting)."""
  rng = np.random.default_rng(seed)
  data2 = ps_points(num_data, rng)
  q = embedding(rng)
  data8 = data2 @ q.T
  results: dict[str, Any] = {
      "settings": dict(steps=steps, batch=batch, hidden=hidden, depth=depth, lr=lr,
                       num_data=num_data, num_samples=num_samples, sample_steps=sample_steps,
                       seed=seed, ambient_dim=AMBIENT_DIM, top_fraction=TOP_FRACTION)}
  samples = {}
  for name, data in (("2d", data2), ("8d", data8)):
    started = time.perf_counter()
    params, losses = train_flow(data, steps=steps, batch=batch, hidden=hidden, depth=depth,
                                lr=lr, seed=seed)
    x = sample_flow(params, num_samples, data.shape[1], sample_steps=sample_steps,
                    seed=seed + 1)
    nn = nearest_distances(x, data)
    entry = {"dim": int(data.shape[1]), "top5_nn_distance": top_fraction_mean(nn),
             "mean_nn_distance": float(nn.mean()),
             "final_loss": float(np.mean(losses[-max(1, steps // 20):])),
             "seconds": round(time.perf_counter() - started, 2)}
    if name == "8d":
      off_plane = x - (x @ q) @ q.T
      entry["mean_off_plane_norm"] = float(np.linalg.norm(off_plane, axis=1).mean())
      samples[name] = x @ q  # in the manifold's plane coordinates, for the plot
    else:
      samples[name] = x
    results[name] = entry
  results["ratio_top5_8d_over_2d"] = (results["8d"]["top5_nn_distance"]
                                      / max(results["2d"]["top5_nn_distance"], 1e-12))
  results["_samples"] = {"data": data2, **samples}
  return results


def format_table(results: dict[str, Any]) -> str:
  rows = [("model space", "top-5% NN distance", "mean NN distance", "off-plane norm",
           "final loss", "seconds")]
  for name in ("2d", "8d"):
    r = results[name]
    rows.append((f"{r['dim']}-D", f"{r['top5_nn_distance']:.4f}", f"{r['mean_nn_distance']:.4f}",
                 f"{r['mean_off_plane_norm']:.4f}" if "mean_off_plane_norm" in r else "-",
                 f"{r['final_loss']:.4f}", f"{r['seconds']:.1f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "-+-".join("-" * w for w in widths))
  lines.append(f"8-D / 2-D top-5% NN distance: {results['ratio_top5_8d_over_2d']:.2f}x")
  return "\n".join(lines)


def scatter_png(points: dict[str, np.ndarray], path: str, size: int = 320) -> None:
  """Side-by-side scatter plots (data, 2-D samples, 8-D samples in plane coordinates)."""
  panels = []
  for name in ("data", "2d", "8d"):
    img = np.full((size, size, 3), 255, np.uint8)
    p = points[name]
    px = np.clip(((p + 2.5) / 5.0 * size).astype(int), 0, size - 1)
    img[size - 1 - px[:, 1], px[:, 0]] = (30, 30, 160) if name == "data" else (200, 40, 40)
    panels.append(img)
  gutter = np.full((size, 4, 3), 200, np.uint8)
  files.write_png(path, np.concatenate([panels[0], gutter, panels[1], gutter, panels[2]], 1))


# --- command line ------------------------------------------------------------------------------

def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags (defined on demand, so importing the module defines none)."""
  f = dict(flag_values=flag_values)
  flags.DEFINE_integer("steps", 4000, "Training steps of each model.", **f)
  flags.DEFINE_integer("batch", 512, "Batch size.", **f)
  flags.DEFINE_integer("hidden", 256, "MLP width.", **f)
  flags.DEFINE_integer("depth", 3, "Hidden layers.", **f)
  flags.DEFINE_float("lr", 3e-3, "Peak learning rate (cosine decay).", **f)
  flags.DEFINE_integer("num_data", 8000, "Data points.", **f)
  flags.DEFINE_integer("num_samples", 4000, "Samples per model.", **f)
  flags.DEFINE_integer("sample_steps", 50, "Euler steps.", **f)
  flags.DEFINE_integer("seed", 0, "Data, embedding, init and noise seed.", **f)
  flags.DEFINE_string("out", "", "Optional JSON output path.", **f)
  flags.DEFINE_string("png", "", "Optional scatter plot (data | 2-D samples | 8-D samples "
                      "projected on the plane).", **f)


def run_from_flags(flag_values=flags.FLAGS) -> dict[str, Any]:
  """Runs the experiment with parsed flags, prints the table, writes the outputs."""
  v = flag_values
  for name in ("steps", "batch", "hidden", "depth", "num_data", "num_samples", "sample_steps"):
    if v[name].value < 1:
      raise app.UsageError(f"--{name} must be >= 1")
  results = run_experiment(steps=v.steps, batch=v.batch, hidden=v.hidden, depth=v.depth,
                           lr=v.lr, num_data=v.num_data, num_samples=v.num_samples,
                           sample_steps=v.sample_steps, seed=v.seed)
  samples = results.pop("_samples")
  print(format_table(results))
  if v.out:
    files.write_json(v.out, results)
  if v.png:
    scatter_png(samples, v.png)
  return results


def main(argv):
  cli.no_arguments(argv)
  run_from_flags()


if __name__ == "__main__":
  define_flags()
  app.run(main)
