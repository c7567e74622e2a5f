"""layers/ssm: the chunked SSD and the causal conv against token-by-token references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import DEFAULT_LOGICAL_AXIS_RULES

from layers.ssm import causal_conv, document_index
from layers.ssm import ssd as ssd_eager
from helpers.ssd_reference import ssd_sequential as sequential_eager

jax.config.update("jax_default_matmul_precision", "highest")
H, D, NG, N = 4, 3, 2, 5
ssd = jax.jit(ssd_eager, static_argnames="chunk_size")
ssd_sequential = jax.jit(sequential_eager)


def inputs(seed, b, t, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
  return dict(x=normal(b, t, H, D), dt=jnp.asarray(rng.uniform(0.01, 0.5, (b, t, H)), jnp.float32),
              a=-jnp.asarray(rng.uniform(0.5, 3.0, H), jnp.float32),
              bmat=normal(b, t, NG, N), cmat=normal(b, t, NG, N),
              d_skip=jnp.asarray(rng.standard_normal(H), jnp.float32))


def packed_ids(t, cuts, pad=0):
  """int32 [2, t]: row 0 packs documents ending at `cuts`; row 1 is `pad` zeros then ones."""
  row0 = np.searchsorted(np.asarray(cuts), np.arange(t), side="right") + 1
  row1 = (np.arange(t) >= pad).astype(np.int32)
  return jnp.asarray(np.stack([row0, row1]), jnp.int32)


@pytest.mark.parametrize("t", [1, 13, 33])
@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_matches_sequential(t, chunk, packed):
  args = inputs(t, 2, t)
  seg = packed_ids(t, [t // 3, t // 2], pad=t // 4) if packed else None
  state0 = jnp.asarray(np.random.default_rng(1).standard_normal((2, H, D, N)), jnp.float32)
  y, final = ssd(**args, chunk_size=chunk, segment_ids=seg, initial_state=state0)
  y_ref, final_ref = ssd_sequential(**args, segment_ids=seg, initial_state=state0)
  np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(final, final_ref, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("heads,groups", [(4, 1), (4, 4), (6, 3)])
@pytest.mark.parametrize("t,chunk", [(2, 3), (31, 8), (64, 16), (100, 32), (129, 64)])
def test_chunked_matches_sequential_sweep(heads, groups, t, chunk):
  """Group layouts and long rows with many chunks and documents."""
  rng = np.random.default_rng(t)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  args = dict(x=normal(2, t, heads, D), dt=jnp.asarray(rng.uniform(0.01, 0.5, (2, t, heads)),
                                                       jnp.float32),
              a=-jnp.asarray(rng.uniform(0.5, 3.0, heads), jnp.float32),
              bmat=normal(2, t, groups, N), cmat=normal(2, t, groups, N),
              d_skip=normal(heads))
  seg = packed_ids(t, sorted(rng.integers(0, t, 4).tolist()), pad=t // 5)
  y, final = ssd(**args, chunk_size=chunk, segment_ids=seg)
  y_ref, final_ref = ssd_sequential(**args, segment_ids=seg)
  np.testing.assert_allclose(y, y_ref, atol=5e-5, rtol=5e-5)
  np.testing.assert_allclose(final, final_ref, atol=5e-5, rtol=5e-5)


def test_bfloat16_inputs_keep_float32_state():
  args = inputs(0, 2, 40, jnp.bfloat16)
  y, final = ssd(**args, chunk_size=16)
  y_ref, final_ref = ssd_sequential(**args)
  assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
  scale = float(jnp.abs(y_ref).max())
  np.testing.assert_allclose(y.astype(jnp.float32), y_ref, atol=0.03 * scale)
  np.testing.assert_allclose(final, final_ref, atol=0.03 * float(jnp.abs(final_ref).max()))


def test_gradients_match_sequential():
  args = inputs(2, 2, 11)
  seg = packed_ids(11, [4], pad=3)
  cotangent = jnp.asarray(np.random.default_rng(3).standard_normal((2, 11, H, D)), jnp.float32)

  def loss(fn, **kw):
    return lambda a: jnp.sum(fn(**a, **kw)[0] * cotangent) + jnp.sum(fn(**a, **kw)[1] ** 2)

  grads = jax.grad(loss(ssd_eager, chunk_size=4, segment_ids=seg))(args)
  grads_ref = jax.grad(loss(sequential_eager, segment_ids=seg))(args)
  for name in args:
    assert np.all(np.isfinite(grads[name])), name
    np.testing.assert_allclose(grads[name], grads_ref[name], atol=1e-4, rtol=1e-4,
                               err_msg=name)


def test_pallas_impl_runs_per_shard_like_xla():
  """impl='pallas' (the TPU kernel, interpreted on CPU) under a data x tensor mesh runs in a
  shard_map (heads and their B/C groups split together) and matches 'xla', grads too."""
  args = inputs(3, 4, 12)  # NG = 2 groups of 2 heads: each tensor shard holds one group.
  seg = jnp.asarray(np.repeat([[1] * 5 + [2] * 7], 4, axis=0), jnp.int32)
  state0 = jnp.asarray(np.random.default_rng(4).standard_normal((4, H, D, N)), jnp.float32)
  kw = dict(chunk_size=8, segment_ids=seg, initial_state=state0)

  def loss(impl):
    def fn(args):
      y, final = ssd_eager(**args, impl=impl, **kw)
      return jnp.sum(y * y) + jnp.sum(final), (y, final)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))
  mesh = jax.make_mesh((2, 1, 2, 1, 1), ("data", "fsdp", "tensor", "expert", "sequence"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 5)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
    lowered = loss("pallas").lower(args)
    assert "manual_computation" in lowered.as_text()  # The shard_map.
    (_, got), got_grads = lowered.compile()(args)
  (_, want), want_grads = loss("xla")(args)
  for g, w in zip(jax.tree.leaves((got, got_grads)), jax.tree.leaves((want, want_grads))):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


def test_document_index():
  seg = jnp.asarray([[0, 0, 1, 1, 2], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(document_index(seg, seg.shape), [[0, 0, 1, 1, 2], [0] * 5])
  np.testing.assert_array_equal(document_index(seg, seg.shape, jnp.asarray([0, 0])),
                                [[0, 0, 1, 1, 2], [1] * 5])


def conv_reference(x, kernel, bias, seg):
  """Per row and document, numpy's full convolution cut to causal length."""
  out = np.zeros(x.shape, np.float64)
  w = kernel.shape[0]
  for row in range(x.shape[0]):
    for doc in np.unique(seg[row]):
      idx = np.nonzero(seg[row] == doc)[0]
      for ch in range(x.shape[2]):
        out[row, idx, ch] = np.convolve(x[row, idx, ch], kernel[::-1, ch])[:len(idx)]
  return out + bias


def test_conv_resets_per_document_and_continues_from_its_window():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 15, 6)).astype(np.float32)
  kernel, bias = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal(6)
  seg = np.asarray(packed_ids(15, [5, 6], pad=4))
  doc = document_index(jnp.asarray(seg), seg.shape)
  out, _ = causal_conv(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), doc)
  np.testing.assert_allclose(out, conv_reference(x, kernel, bias, seg), atol=1e-5)
  # Split anywhere: the second call continues from the first call's window.
  for cut in (1, 5, 9):
    first, window = causal_conv(jnp.asarray(x[:, :cut]), kernel, bias, doc[:, :cut])
    doc2 = document_index(jnp.asarray(seg[:, cut:]), seg[:, cut:].shape,
                          jnp.asarray(seg[:, cut - 1]))
    second, _ = causal_conv(jnp.asarray(x[:, cut:]), kernel, bias, doc2, window)
    np.testing.assert_allclose(np.concatenate([first, second], 1), out, atol=1e-5)
