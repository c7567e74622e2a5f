"""language_model.is_argmax: argmax(logits) == targets without an argmax, ties to the first index."""

import jax.numpy as jnp
import numpy as np
import pytest

from train.tasks.language_model import is_argmax


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_argmax_with_many_ties(dtype):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.integers(0, 4, (8, 16, 12)), dtype)  # Ties in almost every row.
  argmax = np.asarray(jnp.argmax(logits, axis=-1))
  for seed in range(3):
    targets = np.random.default_rng(seed).integers(0, 12, (8, 16))
    targets = np.where(rng.random((8, 16)) < 0.5, argmax, targets).astype(np.int32)
    got = np.asarray(is_argmax(logits, jnp.asarray(targets)))
    np.testing.assert_array_equal(got, argmax == targets)
    assert 0 < got.sum() < got.size
