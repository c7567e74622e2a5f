"""The tiled grouped matmul equals jax.lax.ragged_dot, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.moe import grouped_matmul


@pytest.mark.parametrize("sizes,rows,tile", [
    # An empty group, groups longer than a tile, rows past sum(group_sizes) (padding).
    ((5, 0, 17, 3), 30, 4),
    pytest.param((1, 1, 1), 7, 8, marks=pytest.mark.slow),  # groups shorter than a tile
    pytest.param((0, 0, 12), 12, 5, marks=pytest.mark.slow),  # every row in the last group
])
def test_tiled_matches_ragged(sizes, rows, tile):
  e, m = 6, 10
  keys = jax.random.split(jax.random.key(sum(sizes) + tile), 4)
  xs = jax.random.normal(keys[0], (rows, e))
  gate = jax.random.normal(keys[1], (len(sizes), e, m))
  up = jax.random.normal(keys[2], (len(sizes), e, m))
  down = jax.random.normal(keys[3], (len(sizes), m, e))
  group_sizes = jnp.array(sizes, jnp.int32)

  def loss(impl, *args):
    y = grouped_matmul.swiglu_grouped(*args, group_sizes, impl=impl, tile=tile)
    return jnp.sum(y * jnp.arange(y.size).reshape(y.shape) / y.size), y

  with jax.default_matmul_precision("highest"):
    (_, ragged), ragged_grads = jax.value_and_grad(
        lambda *a: loss("ragged", *a), argnums=(0, 1, 2, 3), has_aux=True)(xs, gate, up, down)
    (_, tiled), tiled_grads = jax.value_and_grad(
        lambda *a: loss("tiled", *a), argnums=(0, 1, 2, 3), has_aux=True)(xs, gate, up, down)
  np.testing.assert_allclose(tiled, ragged, rtol=1e-5, atol=1e-5)
  assert not np.asarray(tiled)[sum(sizes):].any()
  for got, want in zip(tiled_grads, ragged_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_impl_is_an_error():
  with pytest.raises(ValueError, match="impl='triton'"):
    grouped_matmul.swiglu_grouped(jnp.zeros((2, 2)), *(jnp.zeros((1, 2, 2)),) * 3,
                                  jnp.array([2]), impl="triton")
