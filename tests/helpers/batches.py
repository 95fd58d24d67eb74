"""Comparing training batches (dicts of numpy arrays, str fields as object arrays)."""
import numpy as np


def assert_same_batch(a: dict, b: dict) -> None:
  """`a` and `b` hold the same fields with identical values."""
  assert a.keys() == b.keys()
  for key in a:
    if a[key].dtype == object:
      assert list(a[key]) == list(b[key]), key
    else:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
