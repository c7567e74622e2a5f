"""Sliding-window attention: every implementation against a naive loop, gradients of the
CPU blocked path, and the rolling KV cache of `Attention` at decode time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import Attention, cpu_blocked, implementations

jax.config.update("jax_default_matmul_precision", "highest")
B, T, H, K, D, WINDOW = 2, 24, 4, 2, 16, 5
SEGMENTS = np.array([[1] * 14 + [2] * 10, [0] * 3 + [1] * 21], np.int32)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _inputs():
  return _normal(0, (B, T, H, D)), _normal(1, (B, T, K, D)), _normal(2, (B, T, K, D))


def _naive(q, k, v, segment_ids, window):
  """float64 loop: query i sees keys i - window + 1 .. i of its own nonzero segment."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros_like(q)
  group = q.shape[2] // k.shape[2]
  for bi in range(q.shape[0]):
    for hi in range(q.shape[2]):
      for i in range(q.shape[1]):
        seen = [j for j in range(max(0, i - window + 1), i + 1)
                if segment_ids[bi, j] == segment_ids[bi, i] != 0]
        if not seen:
          continue
        logits = np.array([q[bi, i, hi] @ k[bi, j, hi // group] for j in seen]) / np.sqrt(D)
        p = np.exp(logits - logits.max())
        out[bi, i, hi] = sum(pj * v[bi, j, hi // group] for pj, j in zip(p / p.sum(), seen))
  return out


def test_every_cpu_implementation_matches_the_naive_window():
  q, k, v = _inputs()
  seg = jnp.asarray(SEGMENTS)
  want = _naive(q, k, v, SEGMENTS, WINDOW)
  real = SEGMENTS != 0
  mask = implementations.attention_mask(T, T, q_segment_ids=seg, kv_segment_ids=seg,
                                        sliding_window=WINDOW)
  outs = jax.jit(lambda q, k, v: {
      "xla_masked": implementations.xla_attention(q, k, v, mask),
      "cpu_blocked": cpu_blocked.causal_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                                  num_blocks=3, sliding_window=WINDOW),
      "pallas_interpret": implementations.dot_product_attention(
          q, k, v, impl="pallas", q_segment_ids=seg, kv_segment_ids=seg, interpret=True,
          sliding_window=WINDOW),
  })(q, k, v)
  for name, out in outs.items():
    np.testing.assert_allclose(np.asarray(out)[real], want[real], atol=2e-5, err_msg=name)
  unlimited = implementations.xla_attention(
      q, k, v, implementations.attention_mask(T, T, q_segment_ids=seg, kv_segment_ids=seg))
  assert np.abs(np.asarray(unlimited)[real] - want[real]).max() > 1e-2  # The window matters.


def test_cpu_blocked_window_gradients_match_the_reference():
  q, k, v = _inputs()
  seg = jnp.asarray(SEGMENTS)
  mask = implementations.attention_mask(T, T, q_segment_ids=seg, kv_segment_ids=seg,
                                        sliding_window=WINDOW)
  weight = _normal(3, (B, T, H, D)) * jnp.asarray(SEGMENTS != 0)[:, :, None, None]
  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * weight)
  blocked = jax.jit(jax.grad(loss(lambda q, k, v: cpu_blocked.causal_attention(
      q, k, v, q_segment_ids=seg, kv_segment_ids=seg, num_blocks=4, sliding_window=WINDOW)),
                     argnums=(0, 1, 2)))(q, k, v)
  reference = jax.jit(jax.grad(loss(lambda q, k, v: implementations.xla_attention(q, k, v, mask)),
                               argnums=(0, 1, 2)))(q, k, v)
  for name, got, want in zip("qkv", blocked, reference):
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("prefill", [3, 9])  # Shorter and longer than the window.
def test_rolling_cache_decode_matches_the_full_forward(prefill):
  layer = Attention(H, K, D, rope_theta=100.0, sliding_window=WINDOW, attention_impl="xla")
  x = _normal(4, (B, T, 32))
  params = layer.init(jax.random.key(0), x[:, :2])["params"]
  full = jax.jit(layer.apply)({"params": params}, x)
  cache = layer.init(jax.random.key(0), jnp.zeros((B, T, 32)), decode=True)["cache"]
  assert cache["cached_key"].value.shape == (B, WINDOW, K, D)  # Holds the window, not T.
  step = jax.jit(lambda state, x: layer.apply({"params": params, **state}, x, decode=True,
                                              mutable=["cache"]))
  out, state = step({"cache": cache}, x[:, :prefill])
  outs = [out]
  for i in range(prefill, T):
    out, state = step(state, x[:, i:i + 1])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)
  assert int(state["cache"]["cache_index"].value) == T
