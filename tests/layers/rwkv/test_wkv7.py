"""The WKV-7 recurrence (sequential scan and chunked matrix form) and the token shift against
token-by-token references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.wkv7_reference import wkv7_reference
from layers.rwkv import token_shift, unit_lower_inverse, wkv7, wkv7_chunked
from layers.ssm import document_index

jax.config.update("jax_default_matmul_precision", "highest")


def inputs(seed, b=2, t=13, h=3, d=8):
  """RWKV-7-like inputs: decays in (0.54, 1), a = −k̂, b = k̂·iclr."""
  rng = np.random.default_rng(seed)
  r, k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(3))
  w = np.exp(-np.exp(-0.5) / (1 + np.exp(-rng.normal(size=(b, t, h, d))))).astype(np.float32)
  kk = rng.normal(size=(b, t, h, d))
  kk = (kk / np.linalg.norm(kk, axis=-1, keepdims=True)).astype(np.float32)
  iclr = rng.uniform(size=(b, t, h, d)).astype(np.float32)
  return r, w, k, v, -kk, kk * iclr


def correlated_inputs(seed, b=1, t=70, h=2, d=16, similarity=0.95):
  """Trained-like inputs: normalised keys nearly parallel along the row and an in-context
  learning rate near 1, so the in-chunk matrix (I − A_b) has entries near 1 below the
  diagonal (random keys are nearly orthogonal and leave A_b small)."""
  rng = np.random.default_rng(seed)
  r, k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(3))
  w = np.exp(-np.exp(-0.5) * rng.uniform(0, 0.2, size=(b, t, h, d))).astype(np.float32)
  kk = similarity * rng.normal(size=(b, 1, h, d)) + (1 - similarity) * rng.normal(size=(b, t, h, d))
  kk = (kk / np.linalg.norm(kk, axis=-1, keepdims=True)).astype(np.float32)
  return r, w, k, v, -kk, kk * np.float32(0.95)


FORMS = {"scan": wkv7, "chunk4": lambda *a, **kw: wkv7_chunked(*a, chunk_size=4, **kw),
         "chunk16": lambda *a, **kw: wkv7_chunked(*a, chunk_size=16, **kw)}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("t", [1, 7, 33])
def test_matches_reference(form, t):
  args = inputs(t, t=t)
  y, state = FORMS[form](*args)
  y_ref, state_ref = wkv7_reference(*args)
  np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(state, state_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_segments_and_initial_state(form):
  args = inputs(1, t=17)
  seg = np.array([[1] * 5 + [2] * 9 + [3] * 3, [0] * 4 + [1] * 13], np.int32)
  init = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
  # A first token continuing the initial state (document 0) reads it ...
  y, state = FORMS[form](*args, doc=document_index(seg, seg.shape), initial_state=init)
  y_ref, state_ref = wkv7_reference(*args, segment_ids=seg, initial_state=init)
  np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(state, state_ref, atol=1e-4, rtol=1e-4)
  # ... one starting a new document does not.
  doc = document_index(seg, seg.shape, jnp.array([7, 7]))
  y, _ = FORMS[form](*args, doc=doc, initial_state=init)
  y_ref, _ = wkv7_reference(*args, segment_ids=seg)
  np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunked_long_rows_with_documents(chunk):
  """Long rows, many short documents, strongest decays: the chunked form stays at the
  sequential scan's values (no ratio of decay products is ever formed)."""
  args = list(inputs(9, b=2, t=300, h=2, d=16))
  args[1][0, :150] = np.float32(np.exp(-np.exp(-0.5)))  # the fastest decay RWKV-7 allows
  seg = np.cumsum(np.random.default_rng(3).uniform(size=(2, 300)) < 0.05, axis=1)
  doc = document_index(seg, seg.shape)
  y, state = wkv7_chunked(*args, chunk_size=chunk, doc=doc)
  y_ref, state_ref = wkv7(*args, doc=doc)
  np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(state, state_ref, atol=1e-4, rtol=1e-4)


def test_gradients_match_reference_autodiff():
  args = [jnp.asarray(x) for x in inputs(3, b=1, t=6, h=2, d=4)]

  def unrolled(*xs):  # the same recurrence in plain jnp, unrolled (no scan)
    state = jnp.zeros((1, 2, 4, 4))
    ys = []
    for i in range(6):
      r, w, k, v, a, b = (x[:, i] for x in xs)
      state = (state * w[:, :, None, :] + jnp.einsum("bhij,bhj->bhi", state, a)[..., None]
               * b[:, :, None, :] + v[..., None] * k[:, :, None, :])
      ys.append(jnp.einsum("bhij,bhj->bhi", state, r))
    return jnp.stack(ys, 1)

  weights = jnp.asarray(np.random.default_rng(4).normal(size=(1, 6, 2, 4)), jnp.float32)
  loss = lambda f: lambda *xs: jnp.sum(f(*xs) * weights)  # noqa: E731
  expected = jax.grad(loss(unrolled), argnums=tuple(range(6)))(*args)
  for form in (wkv7, lambda *xs: wkv7_chunked(*xs, chunk_size=4)):
    grads = jax.grad(loss(lambda *xs: form(*xs)[0]), argnums=tuple(range(6)))(*args)
    for g, e in zip(grads, expected):
      np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-4)


def test_chunked_gradients_with_documents_match_scan():
  args = [jnp.asarray(x) for x in inputs(8, b=2, t=19, h=2, d=8)]
  seg = np.repeat([[1, 2, 3, 4]], 2, 0).repeat([3, 9, 1, 6], axis=1)
  doc = document_index(seg, seg.shape)
  init = jnp.asarray(np.random.default_rng(5).normal(size=(2, 2, 8, 8)), jnp.float32)
  weights = jnp.asarray(np.random.default_rng(6).normal(size=(2, 19, 2, 8)), jnp.float32)

  def loss(form):
    def f(init, *xs):
      y, state = form(*xs, doc=doc, initial_state=init)
      return jnp.sum(y * weights) + jnp.sum(state * init)
    return f
  chunked = lambda *a, **kw: wkv7_chunked(*a, chunk_size=8, **kw)  # noqa: E731
  grads = jax.grad(loss(chunked), argnums=tuple(range(7)))(init, *args)
  expected = jax.grad(loss(wkv7), argnums=tuple(range(7)))(init, *args)
  for g, e in zip(grads, expected):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, e, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_causal(form):
  args = list(inputs(5, t=10))
  y, _ = FORMS[form](*args)
  for x, other in zip(args, inputs(6, t=10)):  # new valid inputs (decays in (0, 1)) from 6 on
    x[:, 6:] = other[:, 6:]
  y2, _ = FORMS[form](*args)
  np.testing.assert_allclose(y[:, :6], y2[:, :6], atol=0)


def test_token_shift_resets_at_documents():
  x = np.arange(1, 7, dtype=np.float32).reshape(1, 6, 1)
  seg = np.array([[1, 1, 2, 2, 2, 3]])
  shifted, last = token_shift(x, document_index(seg, seg.shape), jnp.full((1, 1), 9.0))
  np.testing.assert_array_equal(shifted[0, :, 0], [9, 1, 0, 3, 4, 0])
  assert last[0, 0] == 6
  shifted, _ = token_shift(x)
  np.testing.assert_array_equal(shifted[0, :, 0], [0, 1, 2, 3, 4, 5])


@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunked_stays_exact_with_correlated_keys(chunk):
  """The in-chunk inverse is built by block doubling: with trained-like keys the Neumann
  product of powers of A_b lost every digit at 64 tokens (and 1e-4 already at 16)."""
  args = correlated_inputs(chunk)
  y, state = wkv7_chunked(*args, chunk_size=chunk)
  y_ref, state_ref = wkv7_reference(*args)
  scale = np.abs(y_ref).max()
  np.testing.assert_allclose(y, y_ref, atol=2e-6 * scale * chunk, rtol=1e-4)
  np.testing.assert_allclose(state, state_ref, atol=2e-6 * np.abs(state_ref).max() * chunk,
                             rtol=1e-4)


def test_unit_lower_inverse_with_entries_near_one():
  """(I − a)⁻¹ stays O(1) for a ≈ −0.9 below the diagonal, while a's powers reach 1e16."""
  rng = np.random.default_rng(0)
  a = -0.9 * np.tril(1 + 0.01 * rng.normal(size=(64, 64)), -1)
  np.testing.assert_allclose(unit_lower_inverse(jnp.asarray(a, jnp.float32)),
                             np.linalg.inv(np.eye(64) - a), atol=1e-5)


@pytest.mark.parametrize("length", [1, 2, 5, 16, 64])
def test_unit_lower_inverse(length):
  a = np.tril(np.random.default_rng(length).normal(size=(3, length, length)) * 0.3, -1)
  np.testing.assert_allclose(unit_lower_inverse(jnp.asarray(a, jnp.float32)),
                             np.linalg.inv(np.eye(length) - a), atol=1e-5, rtol=1e-5)
