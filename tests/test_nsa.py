"""NativeSparseAttention: against the plain reference, causality, selection rules, training.

Small sizes throughout: compress_block 8, stride 4, select_block 16, top_n 4,
window 32 at t = 100 (7 selection blocks, so selection is really sparse).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from layers import nsa_compression as cmp_lib
from layers.nsa import NativeSparseAttention
from layers.nsa_reference import nsa_reference

SIZES = dict(num_heads=4, num_kv_heads=2, head_dim=16, compress_block=8, compress_stride=4,
             select_block=16, select_top_n=4, window=32)
B, T, E = 2, 100, 32


def _setup(impl="xla", seed=0, **overrides):
  layer = NativeSparseAttention(attention_impl=impl, **{**SIZES, **overrides})
  x = jax.random.normal(jax.random.key(seed), (B, T, E))
  params = nn.unbox(layer.init(jax.random.key(seed + 1), x))["params"]
  return layer, params, x


def _packed_ids():
  """Row 0: one segment; row 1: segments of 45 and 55 tokens."""
  return jnp.stack([jnp.ones(T, jnp.int32), 1 + (jnp.arange(T) >= 45).astype(jnp.int32)])


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("overrides", [{}, dict(select_top_n=5, select_local_blocks=1)])
def test_matches_reference(segments, overrides):
  layer, params, x = _setup(**overrides)
  ids = _packed_ids() if segments else None
  got = jax.jit(lambda p, x: layer.apply({"params": p}, x, segment_ids=ids))(params, x)
  want = jax.jit(lambda p, x: nsa_reference(layer, p, x, segment_ids=ids))(params, x)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_pallas_matches_xla_with_grads():
  """impl='pallas' (selection kernel + flash window, interpreted) = 'xla', values and grads."""
  ids = _packed_ids()
  outs = {}
  for impl in ("xla", "pallas"):
    layer, params, x = _setup(impl)

    def loss(p, x):
      y = layer.apply({"params": p}, x, segment_ids=ids)  # noqa: B023
      return jnp.sum(y * jnp.cos(jnp.arange(E)))
    outs[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  (v_x, (gp_x, gx_x)), (v_p, (gp_p, gx_p)) = outs["xla"], outs["pallas"]
  np.testing.assert_allclose(v_p, v_x, rtol=1e-5)
  np.testing.assert_allclose(gx_p, gx_x, atol=1e-4, rtol=1e-4)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(gp_x), jax.tree.leaves(gp_x),
                        jax.tree.leaves(gp_p)):
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4, err_msg=str(path[0]))


def test_causal():
  """Changing token j never changes outputs before j (selection included)."""
  layer, params, x = _setup()
  apply = jax.jit(lambda x: layer.apply({"params": params}, x))
  y = apply(x)
  for j in (3, 17, 50, 99):
    y2 = apply(x.at[:, j].add(5.0 * jax.random.normal(jax.random.key(j), (B, E))))
    np.testing.assert_array_equal(y2[:, :j], y[:, :j])
    assert np.max(np.abs(y2[:, j] - y[:, j])) > 1e-3


def test_selection_rules():
  """First block, own block and the one before are always chosen; never a future block."""
  layer, params, x = _setup(seed=3)
  ids = _packed_ids()
  _, state = jax.jit(lambda p, x: layer.apply(
      {"params": p}, x, segment_ids=ids, mutable=["intermediates"]))(params, x)
  (idx,) = state["intermediates"]["block_indices"]
  idx = np.asarray(idx)  # [b, t, k, n]
  sb = SIZES["select_block"]
  assert idx.shape == (B, T, 2, 4)
  for b in range(B):
    for i in range(T):
      start = 45 if (b == 1 and i >= 45) else 0
      own, first = i // sb, start // sb
      for c in range(2):
        chosen = [j for j in idx[b, i, c] if j >= 0]
        assert len(chosen) == len(set(chosen))
        assert {first, own} | ({own - 1} if own - 1 >= first else set()) <= set(chosen)
        assert all(first <= j <= own for j in chosen)
        eligible = own - first + 1
        assert len(chosen) == min(4, eligible), (b, i, c, chosen)


def test_scores_follow_compressed_probabilities():
  """With one free slot, the choice is the non-forced block of largest mapped probability."""
  t, l, m, sb = 64, 8, 4, 16
  c = cmp_lib.num_compressed(t, l, m)
  probs = jax.random.uniform(jax.random.key(0), (1, 1, 2, t, c))
  idx = np.asarray(cmp_lib.select_blocks(probs, t=t, block=l, stride=m, select_block=sb,
                                         top_n=3, local_blocks=1))
  w = cmp_lib.overlap_weights(t, l, m, sb)
  score = np.einsum("tc,cu->tu", np.asarray(probs[0, 0].sum(0)), w)
  i = 63  # own block 3, first block 0: the free slot goes to argmax of blocks 1, 2
  assert set(idx[0, i, 0]) == {0, 3, 1 + int(np.argmax(score[i, 1:3]))}


def test_overlap_weights_paper_multiplicities():
  """l=32, m=16, L=64: block j gathers compressed blocks 4j-1..4j+3 weighted 1,2,2,2,1."""
  w = cmp_lib.overlap_weights(256, 32, 16, 64)
  np.testing.assert_array_equal(w[3:8, 1], [1, 2, 2, 2, 1])
  assert np.count_nonzero(w[:, 1]) == 5
  np.testing.assert_allclose(w.sum(1), 2.0)  # every compressed block counted l/m times


def test_gradients_finite_and_nonzero():
  layer, params, x = _setup()
  loss = lambda p: jnp.mean(layer.apply({"params": p}, x) ** 2)  # noqa: E731
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    assert np.max(np.abs(g)) > 0, path


def test_training_reduces_loss():
  """A few Adam steps on a fixed random regression target lower the loss."""
  layer, params, x = _setup()
  target = jax.random.normal(jax.random.key(9), (B, T, E))
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((layer.apply({"params": p}, x) - target) ** 2))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = opt.init(params)
  losses = []
  for _ in range(8):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0], losses


def test_rejects_decode_and_bad_config():
  layer, params, x = _setup()
  with pytest.raises(ValueError, match="decode"):
    layer.apply({"params": params}, x, decode=True)
  with pytest.raises(ValueError, match="select_top_n"):
    _setup(select_top_n=2)
  with pytest.raises(ValueError, match="attention_impl"):
    _setup("cudnn")
