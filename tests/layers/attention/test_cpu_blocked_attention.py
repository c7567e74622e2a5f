"""Tests for layers/attention/cpu_blocked.py against the XLA reference attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import implementations as attention_ops
from layers.attention import cpu_blocked as blocked_attention

B, T, H, K, D = 3, 13, 4, 2, 8
SEGMENTS = np.array([[1] * 6 + [2] * 7, [1] * 13, [0, 0] + [1] * 8 + [0] * 3], np.int32)


def _inputs(dtype):
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.standard_normal(shape), dtype)
          for shape in ((B, T, H, D), (B, T, K, D), (B, T, K, D))]


def _reference(q, k, v, seg):
  mask = attention_ops.attention_mask(T, T, q_segment_ids=seg, kv_segment_ids=seg)
  return attention_ops.xla_attention(q, k, v, mask)


def _blocked(num_blocks):
  def attend(q, k, v, seg):
    return blocked_attention.causal_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                              num_blocks=num_blocks)
  return attend


def _value_and_grads(attend, q, k, v, seg):
  # Padding rows are meaningless and, in a model, get no cotangent: weight them 0.
  weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
  weights = weights * (seg != 0)[:, :, None, None]
  loss = lambda q, k, v: jnp.sum(attend(q, k, v, seg).astype(jnp.float32) * weights)  # noqa: E731
  return attend(q, k, v, seg), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("num_blocks,dtype,tol", [
    (1, jnp.float32, 1e-5), (3, jnp.float32, 1e-5),
    pytest.param(13, jnp.float32, 1e-5, marks=pytest.mark.slow), (4, jnp.bfloat16, 2e-2)])
def test_matches_reference_values_and_gradients(num_blocks, dtype, tol):
  q, k, v = _inputs(dtype)
  seg = jnp.asarray(SEGMENTS)
  got, got_grads = _value_and_grads(_blocked(num_blocks), q, k, v, seg)
  want, want_grads = _value_and_grads(_reference, q, k, v, seg)
  real = SEGMENTS != 0
  assert got.dtype == dtype and np.isfinite(np.asarray(got, np.float32)).all()
  np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(want, np.float32)[real],
                             rtol=tol, atol=tol)
  for g, w in zip(got_grads, want_grads):
    assert g.dtype == dtype
    scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=tol, atol=tol * scale)


def test_without_segments_is_causal():
  q, k, v = _inputs(jnp.float32)
  attend = jax.jit(lambda q, k, v: blocked_attention.causal_attention(q, k, v, num_blocks=3))
  base = attend(q, k, v)
  mask = attention_ops.attention_mask(T, T)
  np.testing.assert_allclose(base, attention_ops.xla_attention(q, k, v, mask), rtol=1e-5,
                             atol=1e-5)
  for pos in (0, 5, 12):
    changed = attend(q, k.at[:, pos].add(1.0), v.at[:, pos].add(1.0))
    np.testing.assert_array_equal(changed[:, :pos], base[:, :pos])


def test_dot_product_attention_uses_it_for_self_attention_on_cpu(monkeypatch):
  calls = []
  original = blocked_attention.causal_attention
  monkeypatch.setattr(blocked_attention, "causal_attention",
                      lambda *a, **kw: calls.append(kw["num_blocks"]) or original(*a, **kw))
  q, k, v = _inputs(jnp.float32)
  attention_ops.dot_product_attention(q, k, v, impl="xla")
  assert calls
