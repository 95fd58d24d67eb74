"""MMDiT training-step throughput: this project (JAX) vs diffusers' SD3Transformer2DModel (PyTorch).

  python -m benchmarks.mmdit_step [--batch=8] [--layers=8] [--width=512] [--repeats=5] \
      [--warmup=2] [--json=benchmarks/out/mmdit_step.json]

One training step = forward, MSE loss against a fixed target, backward, AdamW update, on a
mid-size MMDiT: 8 joint layers of width 512 (8 heads x 64), 16x16 latent of 96 channels at patch 1
(256 image tokens), 64 text tokens of width 896 (Qwen2.5-0.5B's), pooled text of width 896,
per-head RMSNorm on q/k, batch 8, float32. The diffusers model is built at that shape with random
weights and saved; this project's MMDiT is loaded from the same weights through
`psvae_jax.ports.diffusers` (so both compute the same function; the forward outputs are
compared), without a DDT head (diffusers has none).
  JAX:      one jitted step (params and AdamW state donated), optax.adamw;
  PyTorch:  model.train(), torch.optim.AdamW (foreach), threads = CPU cores.
Both: the same warm-up calls, then `repeats` timed steps that block until the new parameters
exist (block_until_ready / torch's synchronous CPU execution); the median is reported, with the
median process CPU seconds per step. Achieved FLOP/s uses the analytic count of
`psvae_jax.models.flops.mmdit_train_flops` (matmuls only, 3x forward) for both; the fraction of
peak divides by this machine's measured float32 matmul rate (`psvae_jax.perf.
measured_matmul_peak`, a 2048^3 matmul on one device).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from benchmarks.timing import format_rows, median_seconds, write_json

DEFAULT_OUT = os.path.join("benchmarks", "out", "mmdit_step.json")
TEXT_WIDTH = 896  # Qwen2.5-0.5B
LATENT_CHANNELS = 96
LATENT_SIDE = 16


def _reference(layers: int, width: int, head_dim: int = 64):
  import torch
  from diffusers import SD3Transformer2DModel

  torch.manual_seed(0)
  return SD3Transformer2DModel(
      sample_size=LATENT_SIDE, patch_size=1, in_channels=LATENT_CHANNELS, num_layers=layers,
      attention_head_dim=head_dim, num_attention_heads=width // head_dim,
      joint_attention_dim=TEXT_WIDTH, caption_projection_dim=width,
      pooled_projection_dim=TEXT_WIDTH, out_channels=LATENT_CHANNELS,
      pos_embed_max_size=LATENT_SIDE, qk_norm="rms_norm")


def _inputs(batch: int, text_len: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  side, ch = LATENT_SIDE, LATENT_CHANNELS
  return {
      "x": rng.standard_normal((batch, side, side, ch)).astype(np.float32),
      "text": rng.standard_normal((batch, text_len, TEXT_WIDTH)).astype(np.float32),
      "pooled": rng.standard_normal((batch, TEXT_WIDTH)).astype(np.float32),
      "t": rng.uniform(0, 1000, (batch,)).astype(np.float32),
      "target": rng.standard_normal((batch, side, side, ch)).astype(np.float32),
  }


def _jax_step(module, lr: float):
  """(jitted donated step, initial (params, opt_state), forward fn)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)

  def forward(params, b):
    return nnx.merge(graphdef, params, rest)(b["x"], b["text"], b["pooled"], b["t"])

  def step(carry, b):
    params, opt_state = carry
    loss_fn = lambda p: jnp.mean(jnp.square(forward(p, b) - b["target"]))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return (jax.jit(step, donate_argnums=0), (params, tx.init(params)),
          jax.jit(forward))


def _matmul_flops_per_cpu_second(n: int = 2048, repeats: int = 5) -> float:
  """FLOPs per process CPU second of the n^3 float32 matmul `perf.measured_matmul_peak` times."""
  import jax
  import jax.numpy as jnp

  a = jax.device_put(jnp.ones((n, n), jnp.float32))
  f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  _, cpu = median_seconds(lambda: f(a).block_until_ready(), 1, repeats)
  return 2 * n ** 3 / max(cpu, 1e-9)


def run(batch: int = 8, layers: int = 8, width: int = 512, text_len: int = 64,
        warmup: int = 2, repeats: int = 5, lr: float = 1e-4, out: str | None = DEFAULT_OUT
        ) -> dict:
  """Times both training steps; returns (and writes to `out` as JSON, unless empty) results."""
  import jax
  import torch

  from psvae_jax import perf
  from psvae_jax.models.flops import mmdit_train_flops
  from psvae_jax.ports import diffusers as diffusers_port

  cores = os.cpu_count() or 1
  torch.set_num_threads(cores)
  reference = _reference(layers, width)
  with tempfile.TemporaryDirectory() as tmp:
    reference.save_pretrained(tmp)
    module = diffusers_port.load(tmp)
  config = module.config
  data = _inputs(batch, text_len)

  # --- JAX
  step, carry, forward = _jax_step(module, lr)
  device_batch = jax.device_put(data)
  ours = np.asarray(forward(carry[0], device_batch))
  start = time.perf_counter()
  carry, loss = step(carry, device_batch)
  jax.block_until_ready((carry, loss))
  compile_s = time.perf_counter() - start
  state = {"carry": carry}

  def jax_once():
    state["carry"], loss = step(state["carry"], device_batch)
    jax.block_until_ready((state["carry"], loss))

  jax_s, jax_cpu = median_seconds(jax_once, warmup, repeats)

  # --- PyTorch
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  tb = {"x": nchw(data["x"]), "target": nchw(data["target"]),
        "text": torch.from_numpy(data["text"]), "pooled": torch.from_numpy(data["pooled"]),
        "t": torch.from_numpy(data["t"])}
  reference.train()
  with torch.no_grad():
    theirs = reference(tb["x"], tb["text"], tb["pooled"], tb["t"]).sample.numpy()
  optimizer = torch.optim.AdamW(reference.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.01)

  def torch_once():
    optimizer.zero_grad(set_to_none=True)
    out = reference(tb["x"], tb["text"], tb["pooled"], tb["t"]).sample
    loss = torch.mean(torch.square(out - tb["target"]))
    loss.backward()
    optimizer.step()

  torch_s, torch_cpu = median_seconds(torch_once, warmup, repeats)

  flops = float(mmdit_train_flops(config, batch, text_len))
  peak = perf.measured_matmul_peak("float32")
  peak_cpu = _matmul_flops_per_cpu_second()
  result = {
      "what": (f"MMDiT training step (fwd + bwd + AdamW), {layers} layers, width {width}, "
               f"{LATENT_SIDE ** 2} image + {text_len} text tokens, batch {batch}, float32"),
      "batch": batch, "layers": layers, "width": width, "text_len": text_len,
      "image_tokens": LATENT_SIDE ** 2, "repeats": repeats, "warmup": warmup,
      "cpu_cores": cores, "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "jax_version": jax.__version__, "torch_version": torch.__version__,
      "params": int(sum(p.numel() for p in reference.parameters())),
      "flops_per_step": flops,
      "jax_steps_per_s": 1.0 / jax_s, "torch_steps_per_s": 1.0 / torch_s,
      "ratio": torch_s / jax_s,
      "jax_flops_per_s": flops / jax_s, "torch_flops_per_s": flops / torch_s,
      "measured_matmul_peak_flops_per_s": peak,
      "jax_fraction_of_peak": flops / jax_s / peak,
      "torch_fraction_of_peak": flops / torch_s / peak,
      # The same fractions on CPU time (FLOPs per process CPU second, step vs matmul): less
      # sensitive to other jobs sharing the cores than the wall-clock ones.
      "matmul_flops_per_cpu_s": peak_cpu,
      "jax_fraction_of_peak_cpu_time": flops / jax_cpu / peak_cpu,
      "torch_fraction_of_peak_cpu_time": flops / torch_cpu / peak_cpu,
      "jax_compile_s": compile_s,
      # CPU seconds (all threads) per step: the work done, steadier on a shared machine.
      "jax_cpu_s_per_step": jax_cpu, "torch_cpu_s_per_step": torch_cpu,
      "load_average_1min": os.getloadavg()[0],
      "forward_max_abs_err_vs_diffusers": float(
          np.abs(ours - theirs.transpose(0, 2, 3, 1)).max()),
  }
  write_json(result, out)
  return result


def format_table(r: dict) -> str:
  gf = lambda v: f"{v / 1e9:.1f}"
  pct = lambda v: f"{100 * v:.1f}%"
  rows = [("implementation", "steps/s", "GFLOP/s", "of measured peak", "CPU s/step",
           "of peak (CPU time)")]
  for name, key in (("psvae_jax (jit, donated)", "jax"), ("diffusers SD3 + torch AdamW",
                                                          "torch")):
    rows.append((name, f"{r[key + '_steps_per_s']:.3f}", gf(r[key + "_flops_per_s"]),
                 pct(r[key + "_fraction_of_peak"]), f"{r[key + '_cpu_s_per_step']:.2f}",
                 pct(r[key + "_fraction_of_peak_cpu_time"])))
  return (f"{r['what']}\n" + format_rows(rows) +
          f"\nratio (psvae_jax / diffusers): {r['ratio']:.2f}x; "
          f"{r['flops_per_step'] / 1e9:.1f} GFLOP per step; measured matmul peak "
          f"{r['measured_matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--text_len", type=int, default=64)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=DEFAULT_OUT, help="output JSON ('' = none)")
  args = parser.parse_args(argv)
  result = run(args.batch, args.layers, args.width, args.text_len, args.warmup, args.repeats,
               out=args.json)
  print(format_table(result))
  print(f"forward max abs err vs diffusers: {result['forward_max_abs_err_vs_diffusers']:.2e}; "
        f"jax compile {result['jax_compile_s']:.1f}s; {result['cpu_cores']} cores, load "
        f"average {result['load_average_1min']:.1f}"
        + (f"; written to {args.json}" if args.json else ""))


if __name__ == "__main__":
  main()
