"""Comparing batches from the input pipelines (text and images)."""

import numpy as np


def take(it, n: int) -> list[dict]:
  """The next `n` batches of iterator `it`."""
  return [next(it) for _ in range(n)]


def assert_same_batches(batches_a: list[dict], batches_b: list[dict]) -> None:
  """Same keys, dtypes and values, batch by batch (bitwise)."""
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
