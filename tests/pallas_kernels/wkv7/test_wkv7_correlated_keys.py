"""The WKV-7 kernels' in-chunk inverse on trained-like inputs (keys nearly parallel, in-context
learning rate near 1), where (I − A_b) has entries near 1 below the diagonal.

The TPU and Triton kernels run chunk.py's `chunk_step`, the Mosaic GPU kernel its own
wgmma loop; all build the inverse by block doubling. The earlier Neumann product of A_b's powers lost every float32 digit at 64 tokens
on such inputs (random keys, as in test_wkv7_pallas.py, are nearly orthogonal and hide it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.kernels import FAST_COMPILE
from helpers.wkv7_reference import wkv7_reference
from pallas_kernels.wkv7 import Wkv7Config, wkv7_pallas
from pallas_kernels.wkv7.chunk import _unit_lower_inverse

jax.config.update("jax_default_matmul_precision", "highest")


def correlated_inputs(seed, *, t, h=1, d=32, similarity=0.95):
  rng = np.random.default_rng(seed)
  r, k, v = (rng.normal(size=(1, t, h, d)).astype(np.float32) for _ in range(3))
  w = np.exp(-np.exp(-0.5) * rng.uniform(0, 0.2, size=(1, t, h, d))).astype(np.float32)
  kk = similarity * rng.normal(size=(1, 1, h, d)) + (1 - similarity) * rng.normal(size=(1, t, h, d))
  kk = (kk / np.linalg.norm(kk, axis=-1, keepdims=True)).astype(np.float32)
  return r, w, k, v, -kk, kk * np.float32(0.95)


@pytest.mark.parametrize("length", [16, 64])
def test_kernel_inverse_with_entries_near_one(length):
  rng = np.random.default_rng(length)
  a = -0.9 * np.tril(1 + 0.01 * rng.normal(size=(length, length)), -1)
  inverse = jax.jit(_unit_lower_inverse)(jnp.asarray(a, jnp.float32), jnp.eye(length))
  np.testing.assert_allclose(inverse, np.linalg.inv(np.eye(length) - a), atol=1e-5)


@pytest.mark.parametrize("chip,gpu_kernel", [("tpu_v5e", "mosaic"), ("h100", "mosaic"),
                                             ("h100", "triton")])
def test_kernel_chunk_64_matches_the_oracle(chip, gpu_kernel):
  """Mosaic TPU, Mosaic GPU (its own block-doubling loop) and Triton (chunk.py), interpreted."""
  args = correlated_inputs(0, t=70)
  config = Wkv7Config(chip, 64, gpu_kernel=gpu_kernel)
  fn = jax.jit(lambda *xs: wkv7_pallas(*xs, config=config, interpret=True))
  y, state = fn.lower(*args).compile(FAST_COMPILE)(*args)
  y_ref, state_ref = wkv7_reference(*args)
  np.testing.assert_allclose(y, y_ref, atol=1e-4 * np.abs(y_ref).max(), rtol=1e-4)
  np.testing.assert_allclose(state, state_ref, atol=1e-4 * np.abs(state_ref).max(), rtol=1e-4)
