"""Dense attention (layers/attention/dense.py, implementations.py): the functions, the switch, the layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import Attention
from layers.attention import implementations

jax.config.update("jax_default_matmul_precision", "highest")
_attention = jax.jit(implementations.dot_product_attention, static_argnames=("impl", "interpret"))


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _naive_attention(q, k, v, segment_ids):
  """Per-head loop in float64: causal, same nonzero segment, kv heads shared by groups."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, d = q.shape
  group = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      for i in range(t):
        allowed = [j for j in range(i + 1)
                   if segment_ids[bi, j] == segment_ids[bi, i] and segment_ids[bi, j] != 0]
        if not allowed:
          continue
        logits = np.array([q[bi, i, hi] @ k[bi, j, hi // group] for j in allowed]) / np.sqrt(d)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[bi, i, hi] = sum(pj * v[bi, j, hi // group] for pj, j in zip(p, allowed))
  return out


def test_xla_attention_matches_naive_loop_with_segments():
  b, t, h, k, d = 2, 6, 4, 2, 8
  q, kk, v = _normal(0, (b, t, h, d)), _normal(1, (b, t, k, d)), _normal(2, (b, t, k, d))
  seg = np.array([[1, 1, 1, 2, 2, 0], [0, 0, 1, 1, 1, 1]], np.int32)
  got = _attention(
      q, kk, v, impl="xla", q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg))
  want = _naive_attention(q, kk, v, seg)
  real = seg != 0
  np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(got)).all()  # Padding rows are finite, not NaN.


def test_gqa_equals_mha_with_repeated_kv():
  b, t, h, k, d = 2, 5, 6, 2, 8
  q, kk, v = _normal(0, (b, t, h, d)), _normal(1, (b, t, k, d)), _normal(2, (b, t, k, d))
  gqa = _attention(q, kk, v, impl="xla")
  mha = _attention(
      q, jnp.repeat(kk, h // k, axis=2), jnp.repeat(v, h // k, axis=2), impl="xla")
  np.testing.assert_allclose(gqa, mha, rtol=1e-6, atol=1e-6)


def test_xla_attention_is_causal():
  b, t, h, d = 1, 6, 2, 4
  q, k, v = _normal(0, (b, t, h, d)), _normal(1, (b, t, h, d)), _normal(2, (b, t, h, d))
  base = _attention(q, k, v, impl="xla")
  for pos in range(t):
    changed = _attention(
        q, k.at[:, pos].add(1.0), v.at[:, pos].add(1.0), impl="xla")
    np.testing.assert_array_equal(changed[:, :pos], base[:, :pos])
    assert not np.allclose(changed[:, pos:], base[:, pos:])


def test_attention_mask_with_cache_offset():
  kv_seg = jnp.array([[0, 1, 1, 1, 0, 0]])
  mask = implementations.attention_mask(2, 6, q_segment_ids=jnp.array([[1, 1]]),
                                      kv_segment_ids=kv_seg, q_offset=2)
  np.testing.assert_array_equal(mask[0], [[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0]])


def test_resolve_impl():
  assert implementations.default_backend() == "cpu"
  resolve = implementations.resolve_impl
  assert resolve("auto", backend="cpu", dtype=jnp.bfloat16, head_dim=64) == "xla"
  assert resolve("auto", backend="tpu", dtype=jnp.bfloat16, head_dim=64) == "pallas"
  assert resolve("auto", backend="tpu", dtype=jnp.float16, head_dim=64) == "xla"
  assert resolve("auto", backend="tpu", dtype=jnp.float32, head_dim=512) == "xla"
  assert resolve("auto", backend="cuda", dtype=jnp.bfloat16, head_dim=64) == "cudnn"
  assert resolve("auto", backend="cuda", dtype=jnp.float32, head_dim=64) == "xla"
  assert resolve("auto", backend="cuda", dtype=jnp.bfloat16, head_dim=60) == "pallas"
  assert resolve("auto", backend="cuda", dtype=jnp.float16, head_dim=256) == "pallas"
  assert resolve("pallas", backend="cpu", dtype=jnp.float32, head_dim=64) == "pallas"
  with pytest.raises(ValueError, match="attention_impl='flash'.*xla"):
    resolve("flash", backend="cpu", dtype=jnp.float32, head_dim=64)


def test_attention_layer_auto_uses_xla_on_cpu(monkeypatch):
  calls = []
  original = implementations.dot_product_attention
  def spy(*args, impl, **kwargs):
    calls.append(impl)
    return original(*args, impl=impl, **kwargs)
  monkeypatch.setattr(implementations, "dot_product_attention", spy)
  layer = Attention(num_heads=4, num_kv_heads=2, head_dim=8, attention_impl="auto")
  x = jax.ShapeDtypeStruct((2, 5, 16), jnp.float32)
  params = jax.eval_shape(lambda x: layer.init(jax.random.key(0), x), x)
  assert jax.eval_shape(layer.apply, params, x).shape == (2, 5, 16)
  assert calls and set(calls) == {"xla"}
  kernels = params["params"]
  assert kernels["query"]["kernel"].names == ("embed", "heads", "head_dim")
  assert kernels["key"]["kernel"].names == ("embed", "kv_heads", "head_dim")
  assert kernels["out"]["kernel"].names == ("heads", "head_dim", "embed")
