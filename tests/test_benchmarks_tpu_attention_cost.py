"""benchmarks.tpu_attention_cost: XLA's TPU cost model counts none of the splash kernel's FLOPs
but still gives it a time (from its memory traffic), lower than the 'xla' path's."""
import importlib.util

import pytest

from benchmarks import tpu_attention_cost

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install libtpu==0.0.42.1)")


def test_analytic_flops_is_three_forwards_of_two_matmuls():
  assert tpu_attention_cost.analytic_flops(1, 512) == 3 * 2 * 2 * 16 * 512 ** 2 * 64


@pytest.mark.slow
@needs_libtpu
def test_splash_is_timed_though_its_flops_are_not_counted():
  records = {(r["shape"], r["impl"]): r
             for r in tpu_attention_cost.measure("v5p:2x2x1", per_chip_batch=4)}
  for shape in tpu_attention_cost.SHAPES:
    xla, splash = records[shape, "xla"], records[shape, "splash"]
    # The xla path's matmuls are counted (XLA's count includes the masked-out positions).
    assert xla["xla_flops"] == pytest.approx(xla["analytic_flops"], rel=0.1)
    assert splash["xla_flops"] < 0.01 * splash["analytic_flops"]
    assert 0 < splash["est_seconds"] < xla["est_seconds"]
  table = tpu_attention_cost.rows(list(records.values()))
  assert table[0][2] == "impl" and len(table) == 5
