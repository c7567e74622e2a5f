"""Tests for the flat blocks of layers/: RMSNorm, RoPE, SwiGLU and the Einsum projection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.linear import Einsum
from layers.mlp import SwiGLU
from layers.norms import RMSNorm
from layers.rope import apply_rope

jax.config.update("jax_default_matmul_precision", "highest")


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_rmsnorm_matches_formula():
  x = _normal(0, (2, 3, 8))
  norm = RMSNorm(eps=1e-5)
  params = norm.init(jax.random.key(0), x)
  scale = _normal(1, (8,))
  y = norm.apply({"params": {"scale": scale}}, x)
  xn = np.asarray(x, np.float64)
  want = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-5) * np.asarray(scale)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  assert params["params"]["scale"].names == ("embed",)
  assert RMSNorm(dtype=jnp.bfloat16).apply(params, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("theta", [10_000.0, 500_000.0])
def test_rope_matches_direct_formula(theta):
  b, t, h, d = 2, 5, 3, 8
  x = np.asarray(_normal(0, (b, t, h, d)), np.float64)
  positions = np.array([[0, 1, 2, 3, 4], [7, 3, 0, 11, 100]])
  got = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), theta))
  want = np.empty_like(x)
  for bi in range(b):
    for ti in range(t):
      for i in range(d // 2):  # HF rotate-half: dim i pairs with dim i + d/2.
        angle = positions[bi, ti] * theta ** (-2.0 * i / d)
        c, s = np.cos(angle), np.sin(angle)
        x1, x2 = x[bi, ti, :, i], x[bi, ti, :, i + d // 2]
        want[bi, ti, :, i] = x1 * c - x2 * s
        want[bi, ti, :, i + d // 2] = x2 * c + x1 * s
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
  q, k = _normal(0, (1, 1, 1, 16)), _normal(1, (1, 1, 1, 16))
  def score(m, n):
    qm = apply_rope(q, jnp.array([[m]]), 10_000.0)
    kn = apply_rope(k, jnp.array([[n]]), 10_000.0)
    return float(jnp.sum(qm * kn))
  assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-4)
  assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_swiglu_matches_formula():
  x = _normal(0, (2, 3, 8))
  mlp = SwiGLU(hidden_dim=12)
  params = mlp.init(jax.random.key(0), x)["params"]
  raw = jax.tree.map(lambda p: p.value, params, is_leaf=lambda p: hasattr(p, "names"))
  gate, up, down = raw["gate"]["kernel"], raw["up"]["kernel"], raw["down"]["kernel"]
  want = (jax.nn.silu(x @ gate) * (x @ up)) @ down
  np.testing.assert_allclose(mlp.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)
  assert params["gate"]["kernel"].names == ("embed", "mlp")
  assert params["down"]["kernel"].names == ("mlp", "embed")


def test_einsum_init_is_fan_in_scaled():
  layer = Einsum((4, 8, 256), ("heads", "head_dim", "embed"), "bthd,hde->bte", num_contracting=2)
  kernel = layer.init(jax.random.key(0), jnp.zeros((1, 1, 4, 8)))["params"]["kernel"]
  assert kernel.names == ("heads", "head_dim", "embed")
  std = float(jnp.std(kernel.value))
  assert 0.8 / np.sqrt(32) < std < 1.2 / np.sqrt(32)
