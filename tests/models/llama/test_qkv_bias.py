"""The optional q/k/v projection biases of `Einsum` and `Attention` (Qwen2-style).

Shapes: b batch, t sequence, h heads, k kv heads, d head dim, e embed.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import Attention
from layers.linear import Einsum

jax.config.update("jax_default_matmul_precision", "highest")
B, T, E, H, K, D = 2, 6, 16, 4, 2, 8


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _rope(x, positions, theta):
  """Rotate-half RoPE in float64 numpy, written independently of layers/rope.py."""
  d = x.shape[-1]
  inv_freq = theta ** (-np.arange(0, d, 2) / d)
  angles = positions[..., None, None] * inv_freq  # [b, t, 1, d/2]
  cos, sin = np.cos(angles), np.sin(angles)
  first, second = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)


def _reference_attention(p, x, theta):
  """Causal GQA attention with q/k/v biases, float64 numpy, from the param dict `p`."""
  x = np.asarray(x, np.float64)
  p = jax.tree.map(lambda w: np.asarray(w, np.float64), p)
  positions = np.broadcast_to(np.arange(x.shape[1]), x.shape[:2])
  q = np.einsum("bte,ehd->bthd", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bte,ekd->btkd", x, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bte,ekd->btkd", x, p["value"]["kernel"]) + p["value"]["bias"]
  q, k = _rope(q, positions, theta), _rope(k, positions, theta)
  k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)  # Query head j uses j // g.
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
  scores = np.where(np.tril(np.ones((x.shape[1],) * 2, bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhts,bshd->bthd", probs, v)
  return np.einsum("bthd,hde->bte", out, p["out"]["kernel"])


def test_einsum_bias_adds_over_trailing_axes():
  x = jnp.asarray(_normal(0, (B, T, E)))
  layer = Einsum((E, H, D), ("embed", "heads", "head_dim"), "bte,ehd->bthd",
                 bias_axes=("heads", "head_dim"))
  boxed = layer.init(jax.random.key(0), x)["params"]
  assert boxed["bias"].names == ("heads", "head_dim")
  assert boxed["bias"].value.shape == (H, D)
  np.testing.assert_array_equal(boxed["bias"].value, 0.0)  # Zeros at init.
  params = {"kernel": _normal(1, (E, H, D)), "bias": _normal(2, (H, D))}
  y = layer.apply({"params": params}, x)
  want = np.einsum("bte,ehd->bthd", np.asarray(x), params["kernel"]) + params["bias"]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_einsum_bias_axes_must_match_output():
  x = jnp.zeros((B, T, E))
  with pytest.raises(ValueError, match="bias_axes"):
    Einsum((E, H, D), ("embed", "heads", "head_dim"), "bte,ehd->bthd",
           bias_axes=("heads",)).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="trailing axes"):  # Output [b, h, t, d]: bias misplaced.
    Einsum((E, H, D), ("embed", "heads", "head_dim"), "bte,ehd->bhtd",
           bias_axes=("heads", "head_dim")).init(jax.random.key(0), x)


def test_attention_without_bias_keeps_llama_params():
  x = jnp.zeros((1, 3, E))
  params = Attention(H, K, D, attention_impl="xla").init(jax.random.key(0), x)["params"]
  assert sorted(params) == ["key", "out", "query", "value"]
  assert all(list(params[name]) == ["kernel"] for name in params)


def test_attention_bias_params_and_axes():
  x = jnp.zeros((1, 3, E))
  params = Attention(H, K, D, qkv_bias=True, attention_impl="xla").init(
      jax.random.key(0), x)["params"]
  assert params["query"]["bias"].names == ("heads", "head_dim")
  assert params["query"]["bias"].value.shape == (H, D)
  for name in ("key", "value"):
    assert params[name]["bias"].names == ("kv_heads", "head_dim")
    assert params[name]["bias"].value.shape == (K, D)
  assert "bias" not in params["out"]


@pytest.fixture(name="biased")
def _biased():
  """A qkv-bias Attention layer, random params (biases included) and an input."""
  layer = Attention(H, K, D, rope_theta=500.0, qkv_bias=True, attention_impl="xla")
  x = jnp.asarray(_normal(0, (B, T, E)))
  abstract = nn.unbox(layer.init(jax.random.key(0), x)["params"])
  leaves, treedef = jax.tree.flatten(abstract)
  params = jax.tree.unflatten(
      treedef, [jnp.asarray(0.3 * _normal(i + 1, w.shape)) for i, w in enumerate(leaves)])
  return layer, params, x


def test_attention_with_bias_matches_reference(biased):
  layer, params, x = biased
  y = layer.apply({"params": params}, x)
  np.testing.assert_allclose(y, _reference_attention(params, x, 500.0), rtol=1e-4, atol=1e-5)
  for name in ("query", "key", "value"):  # Each bias matters.
    zeroed = jax.tree.map(lambda w: w, params)
    zeroed[name] = {**params[name], "bias": jnp.zeros_like(params[name]["bias"])}
    assert np.abs(layer.apply({"params": zeroed}, x) - y).max() > 1e-3, name


def test_attention_bias_decode_matches_forward(biased):
  layer, params, x = biased
  full = layer.apply({"params": params}, x)
  cache = layer.init(jax.random.key(0), jnp.zeros((B, T, E)), decode=True)["cache"]
  outs = []
  for i in range(T):
    out, updated = layer.apply({"params": params, "cache": cache}, x[:, i:i + 1], decode=True,
                               mutable=["cache"])
    cache = updated["cache"]
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)
