"""The tpu_aot suite's selection and table, and the TPU presets of the paper configs (no compile)."""
import importlib.util

import pytest

from benchmarks import run
from psvae_jax import tpu_presets


def test_only_selects_by_name_or_leading_words():
  assert run.parse_args(["--suite=tpu_aot", "--only=psvae"]).names == ["psvae_v5p_8",
                                                                       "psvae_v5p_64"]
  assert run.parse_args(["--suite=tpu_aot", "--only=t2i_large"]).names == [
      "t2i_large_v5p_16", "t2i_large_v5p_64"]
  with pytest.raises(SystemExit):
    run.parse_args(["--suite=tpu_aot", "--only=svae"])


def test_set_becomes_config_overrides():
  extra = run.extra_arguments("t2i_v5p_16", "tpu_aot", overrides=("attention_impl=splash",))
  assert extra == ("--config.attention_impl=splash",)


def test_compiles_keep_their_hlo_next_to_the_json():
  cmd = run.command("psvae_v5p_8", "/out", quick=False, suite="tpu_aot")
  assert "--hlo_out=/out/psvae_v5p_8.hlo" in cmd and cmd[-1] == "--out=/out/psvae_v5p_8.json"
  assert not any(a.startswith("--hlo_out") for a in run.command("mmdit_step", "/out", False))


def test_table_row():
  report = {"config": "configs/t2i.py:tpu_v5p", "topology": "v5p:2x2x4",
            "mesh": {"data": 1, "fsdp": 16, "tensor": 1}, "batch_size": 768, "total_gib": 20.25,
            "fits": True, "flops_per_chip": 25.4e12, "dot_flops_per_chip": 46.85e12,
            "analytic_flops_per_chip": 49.4e12, "est_step_time_s": 0.221,
            "est_step_time_s_loops": 0.412, "est_mfu": 0.261, "est_mfu_xla": 0.487,
            "compile_s": 1272.0}
  assert run.tpu_aot_rows({"t2i_v5p_16": report})[1] == (
      "t2i.py:tpu_v5p", "v5p:2x2x4", "1x16x1", "768", "20.2 GiB", "yes", "25.40", "46.85",
      "49.40", "0.412", "26.1%", "0.221", "48.7%", "1272 s")
  # A report from before the loop correction (and a multi-slice one without a time).
  old = dict(report, est_step_time_s=None, est_mfu=None)
  for key in ("dot_flops_per_chip", "est_step_time_s_loops", "est_mfu_xla"):
    del old[key]
  assert run.tpu_aot_rows({"old": old})[1][7:13] == ("-", "49.40", "-", "-", "-", "-")


@pytest.mark.parametrize("preset,expected", [
    ("tpu_v5p", ("", "v5p")), ("large_tpu_v6e", ("large", "v6e")), ("large", ("large", "")),
    ("smoke", ("smoke", ""))])
def test_preset_split(preset, expected):
  assert tpu_presets.split(preset) == expected


def test_unknown_tpu_chip_is_an_error():
  with pytest.raises(ValueError, match="v5p"):
    tpu_presets.split("tpu_v4")


def _config(path, preset):
  spec = importlib.util.spec_from_file_location("config_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def test_presets_set_bf16_and_keep_the_base_preset():
  c = _config("configs/t2i.py", "large_tpu_v6e")
  assert (c.compute_dtype, c.model.generator, c.batch_size, c.model.remat_policy) == (
      "bfloat16", "large", 768, "dots")
  assert (c.mesh.data, c.mesh.fsdp) == (1, -1)  # 32 GiB chips: the state is spread
  c = _config("configs/t2i.py", "tpu_v5p")
  assert (c.mesh.data, c.mesh.fsdp, c.model.remat_policy) == (-1, 1, "")  # copied, as measured
  assert c.attention_impl == "splash"
  c = _config("configs/psvae.py", "tpu_v5p")
  assert (c.compute_dtype, c.batch_size, c.model.remat, c.attention_impl) == (
      "bfloat16", 96, False, "splash")
