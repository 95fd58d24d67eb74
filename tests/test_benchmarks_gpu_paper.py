"""Wiring of `python -m benchmarks.run --suite=gpu_paper` without an accelerator: the command line,
the benchmarks' arguments and resolved paper-scale configs (no model is built), and the peak
lookup. Seconds."""
import os

import numpy as np
import pytest

from benchmarks import attention_numerics
from benchmarks import run as bench_run
from benchmarks import sampling as bench_sampling
from benchmarks import train_step as bench_train_step

_MODULES = {"benchmarks.train_step": bench_train_step, "benchmarks.sampling": bench_sampling,
            "benchmarks.attention_numerics": attention_numerics}


def _benchmark_args(name, **extra):
  """(module, parsed arguments) of gpu_paper benchmark `name` as run.py would start it."""
  cmd = bench_run.command(name, "OUT", False, "gpu_paper",
                          bench_run.extra_arguments(name, "gpu_paper", **extra))
  assert cmd[1] == "-m"
  module = _MODULES[cmd[2]]
  return module, module.parse_args(cmd[3:])


def test_command_line_and_suite_contents():
  args = bench_run.parse_args(["--suite=gpu_paper"])
  assert args.names == ["t2i_step", "psvae_step", "sampling", "attention_numerics"]
  assert args.out == os.path.join("benchmarks", "out_gpu")
  assert bench_run.parse_args([]).out == os.path.join("benchmarks", "out")  # cpu suite unchanged
  for argv in (["--suite=gpu_paper", "--only=mmdit_step"], ["--suite=tpu"],
               ["--peak_tflops=100"], ["--suite=gpu_paper", "--set=no_equals_sign"]):
    with pytest.raises(SystemExit):
      bench_run.parse_args(argv)


def test_t2i_step_is_the_paper_generator_in_bf16_on_cached_inputs():
  _, args = _benchmark_args("t2i_step", batch=32, peak_flops=989e12,
                            overrides=("attention_impl=cudnn",))
  assert args.synthetic_cached and args.batch == 32  # --batch wins over the suite's 64
  assert args.out == os.path.join("OUT", "t2i_step.json")
  config = bench_train_step.benchmark_config(args.config, batch=args.batch,
                                             overrides=tuple(args.set))
  assert (config.model.generator, config.model.ddt_head) == ("base", True)
  assert config.model.cached_inputs and config.compute_dtype == "bfloat16"
  assert config.logging.peak_flops_per_device == 989e12
  assert config.attention_impl == "cudnn"
  from psvae_jax.tasks import get_task
  task = get_task(config)
  assert task.cached_shapes(2) == {"latent": (2, 16, 16, 96), "text_states": (2, 256, 896),
                                   "text_mask": (2, 256)}
  # The analytic count is the generator's alone (the frozen encoders are not in the step).
  from psvae_jax.models.flops import mmdit_train_flops
  assert task.flops_per_example() == float(mmdit_train_flops(task.generator, 1, 256)) > 1e11
  assert _benchmark_args("t2i_step")[1].batch == 64  # documented default


def test_psvae_step_and_sampling_configs_resolve():
  _, args = _benchmark_args("psvae_step", peak_flops=989e12)
  config = bench_train_step.benchmark_config(args.config, batch=args.batch,
                                             overrides=tuple(args.set))
  assert (config.batch_size, config.compute_dtype, config.data.image_size) == (96, "bfloat16", 256)
  assert config.data.source == "synthetic:shapes" and not args.synthetic_cached
  _, args = _benchmark_args("sampling", overrides=("attention_impl=cudnn",))
  config = bench_sampling.sampling_config(args.config, steps=args.steps,
                                          cfg_scale=args.cfg_scale, overrides=tuple(args.set))
  assert (args.batch, config.flow.sample_steps, config.flow.cfg_scale) == (64, 50, 6.5)
  assert config.model.generator == "base" and config.compute_dtype == "bfloat16"
  assert config.attention_impl == "cudnn"


def test_synthetic_cached_batch_needs_cached_inputs():
  from psvae_jax.tasks import get_task
  smoke = ("model.require_autoencoder=False",)
  task = get_task(bench_train_step.benchmark_config(
      "configs/t2i.py:smoke", overrides=smoke + ("model.cached_inputs=True",)))
  batch = bench_train_step.synthetic_cached_batch(task, 3)
  assert {k: v.shape for k, v in batch.items()} == task.cached_shapes(3)
  assert batch["text_mask"].dtype == np.int32 and batch["text_mask"].all()
  task = get_task(bench_train_step.benchmark_config("configs/t2i.py:smoke", overrides=smoke))
  with pytest.raises(ValueError, match="cached_inputs=True"):
    bench_train_step.synthetic_cached_batch(task, 3)


def test_peak_lookup():
  assert bench_run.accelerator_peak("NVIDIA H100 80GB HBM3") == 989e12
  assert bench_run.accelerator_peak("NVIDIA H200") == 989e12
  assert bench_run.accelerator_peak("NVIDIA H100 PCIe") == 756e12
  assert bench_run.accelerator_peak("Some Future GPU", peak_tflops=1500) == 1500e12
  with pytest.raises(ValueError, match="no datasheet bf16 peak .*'cpu'.*--peak_tflops"):
    bench_run.accelerator_peak("cpu")


def test_unknown_accelerator_stops_before_any_benchmark(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(bench_run, "probe_device", lambda: ("gpu", "Mystery GPU", 1))
  started = []
  monkeypatch.setattr(bench_run, "run_one", lambda *a, **k: started.append(a))
  assert bench_run.main(["--suite=gpu_paper", f"--out={tmp_path}"]) == 2
  assert not started
  assert "'Mystery GPU'" in capsys.readouterr().err


def test_cpu_table_uses_one_peak_for_every_mfu():
  """The CPU table's MFU column is against the highest peak measured by any of its processes."""
  results = {
      "mmdit_step": {"layers": 8, "width": 512, "batch": 8, "jax_steps_per_s": 0.4,
                     "torch_steps_per_s": 0.3, "ratio": 1.33, "jax_flops_per_s": 2e11,
                     "torch_flops_per_s": 1.5e11,
                     "jax_fraction_of_peak": 0.5, "measured_matmul_peak_flops_per_s": 4e11},
      "encoder_forward": {"batch": 8, "jax_images_per_s": 2.0, "torch_images_per_s": 1.0,
                          "ratio": 2.0, "flops_per_image": 5e10}}
  peak = bench_run.common_cpu_peak(3e11, results)
  assert peak == 4e11
  rows = bench_run.table_rows(results, peak)
  assert rows[1][-1] == "25.0%" and rows[2][-1] == "50.0%"  # encoder 1e11, MMDiT 2e11 of 4e11
  # Ceiling: the peak over the reference's FLOP/s (encoder 1 img/s x 5e10, MMDiT 1.5e11).
  assert rows[0][4] == "ceiling"
  assert rows[1][4] == "8.00x" and rows[2][4] == "2.67x"
  assert all(len(row) == len(rows[0]) for row in rows)


def test_attention_numerics_measures_both_implementations_in_both_dtypes(monkeypatch):
  _, args = _benchmark_args("attention_numerics")
  assert args.batch == 8 and args.out == os.path.join("OUT", "attention_numerics.json")
  # A shrunk run on this host ('cudnn' is jax's XLA version off a GPU, and says so).
  monkeypatch.setattr(attention_numerics, "SHAPES", {"t2i": 24})
  monkeypatch.setattr(attention_numerics, "TEXT", 8)
  monkeypatch.setattr(attention_numerics, "HEADS", 2)
  records = attention_numerics.measure(batch=2, warmup=0, repeats=1)
  assert [(r["dtype"], r["impl"], r["kernel"]) for r in records] == [
      ("bfloat16", "xla", "xla"), ("bfloat16", "cudnn", "xla"),
      ("float32", "xla", "xla"), ("float32", "cudnn", "xla")]
  for r in records:
    bound = 2e-2 if r["dtype"] == "bfloat16" else 1e-5
    assert 0 <= r["output_error"] < bound and 0 <= r["grad_error"] < bound, r
  assert any(r["output_error"] > 1e-4 for r in records if r["dtype"] == "bfloat16")
  assert len(attention_numerics.rows(records)) == 5
