"""layers/ssm/selective_scan.py: the chunked Mamba-1 scan against a token-by-token oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.selective_scan_reference import selective_scan_sequential as sequential_eager
from layers.ssm import selective_scan as scan_eager

jax.config.update("jax_default_matmul_precision", "highest")
I, N = 6, 5
scan = jax.jit(scan_eager, static_argnames="chunk_size")
sequential = jax.jit(sequential_eager)


def inputs(seed, b, t, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
  return dict(x=normal(b, t, I), dt=jnp.asarray(rng.uniform(0.01, 0.5, (b, t, I)), jnp.float32),
              a=-jnp.asarray(rng.uniform(0.5, 8.0, (I, N)), jnp.float32),
              bmat=normal(b, t, N), cmat=normal(b, t, N),
              d_skip=jnp.asarray(rng.standard_normal(I), jnp.float32))


def packed_ids(t, cuts, pad=0):
  """int32 [2, t]: row 0 packs documents ending at `cuts`; row 1 is `pad` zeros then ones."""
  row0 = np.searchsorted(np.asarray(cuts), np.arange(t), side="right") + 1
  row1 = (np.arange(t) >= pad).astype(np.int32)
  return jnp.asarray(np.stack([row0, row1]), jnp.int32)


@pytest.mark.parametrize("t,chunk,packed", [(1, 4, True), (13, 64, False), (13, 4, True),
                                             (33, 8, True)])
def test_chunked_matches_sequential(t, chunk, packed):
  args = inputs(t, 2, t)
  seg = packed_ids(t, [t // 3, t // 2], pad=t // 4) if packed else None
  state0 = jnp.asarray(np.random.default_rng(1).standard_normal((2, I, N)), jnp.float32)
  y, final = scan(**args, chunk_size=chunk, segment_ids=seg, initial_state=state0)
  y_ref, final_ref = sequential(**args, segment_ids=seg, initial_state=state0)
  np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(final, final_ref, atol=2e-5, rtol=2e-5)


def test_initial_state_of_another_document_is_dropped():
  """initial_segment_ids different from the first token's: the carried state is not read."""
  args = inputs(4, 2, 9)
  state0 = jnp.full((2, I, N), 100.0, jnp.float32)
  seg = jnp.ones((2, 9), jnp.int32)
  y, final = scan(**args, chunk_size=4, segment_ids=seg, initial_state=state0,
                  initial_segment_ids=jnp.asarray([1, 0], jnp.int32))
  y_zero, final_zero = sequential(**args)
  y_cont, _ = sequential(**args, initial_state=state0)
  np.testing.assert_allclose(y[1], y_zero[1], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(final[1], final_zero[1], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(y[0], y_cont[0], atol=2e-4, rtol=2e-5)


def test_split_in_two_calls_continues_exactly():
  """Prefill + continue: the final state of the first part starts the second (row 0 starts
  a new document at the cut, row 1 continues one)."""
  args = inputs(5, 2, 15)
  seg = packed_ids(15, [6], pad=3)
  full, final_full = scan(**args, chunk_size=4, segment_ids=seg)
  cut = 6
  part = lambda lo, hi: {k: (v[:, lo:hi] if k not in ("a", "d_skip") else v)  # noqa: E731
                         for k, v in args.items()}
  first, state = scan(**part(0, cut), chunk_size=4, segment_ids=seg[:, :cut])
  second, final = scan(**part(cut, 15), chunk_size=4, segment_ids=seg[:, cut:],
                       initial_state=state, initial_segment_ids=seg[:, cut - 1])
  np.testing.assert_allclose(np.concatenate([first, second], 1), full, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(final, final_full, atol=2e-5, rtol=2e-5)


def test_bfloat16_inputs_keep_float32_state():
  args = inputs(0, 2, 40, jnp.bfloat16)
  y, final = scan(**args, chunk_size=16)
  y_ref, final_ref = sequential(**args)
  assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
  np.testing.assert_allclose(y.astype(jnp.float32), y_ref, atol=0.02 * float(jnp.abs(y_ref).max()))
  np.testing.assert_allclose(final, final_ref, atol=1e-5, rtol=1e-5)


def test_gradients_match_sequential():
  args = inputs(2, 2, 11)
  seg = packed_ids(11, [4], pad=3)
  state0 = jnp.asarray(np.random.default_rng(3).standard_normal((2, I, N)), jnp.float32)
  cotangent = jnp.asarray(np.random.default_rng(3).standard_normal((2, 11, I)), jnp.float32)

  def loss(fn, **kw):
    def value(a):
      y, final = fn(**{k: v for k, v in a.items() if k != "state"}, initial_state=a["state"],
                    segment_ids=seg, **kw)
      return jnp.sum(y * cotangent) + jnp.sum(final ** 2)
    return value

  args["state"] = state0
  grads = jax.jit(jax.grad(loss(scan_eager, chunk_size=4)))(args)
  grads_ref = jax.jit(jax.grad(loss(sequential_eager)))(args)
  for name in args:
    assert np.all(np.isfinite(grads[name])), name
    np.testing.assert_allclose(grads[name], grads_ref[name], atol=1e-4, rtol=1e-4,
                               err_msg=name)
