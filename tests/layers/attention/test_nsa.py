"""NativeSparseAttention: against the plain reference, causality, selection rules,
KV-cache decoding, training.

Small sizes throughout: compress_block 8, stride 4, select_block 16, top_n 4,
window 32 at t = 100 (7 selection blocks, so selection is really sparse).
Variants, the interpreted-kernel layer check and training run with -m slow.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers.nsa_reference import nsa_reference
from layers.attention import nsa_compression as cmp_lib
from layers.attention.nsa import NativeSparseAttention, resolve_impl

SIZES = dict(num_heads=4, num_kv_heads=2, head_dim=16, compress_block=8, compress_stride=4,
             select_block=16, select_top_n=4, window=32)
B, T, E = 2, 100, 32


# Unoptimized XLA compiles these small programs several times faster (init most).
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _run_fast(fn, *args):
  """fn(*args), jitted and compiled without XLA's optimization passes."""
  return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


def _setup(impl="xla", seed=0, **overrides):
  layer = NativeSparseAttention(attention_impl=impl, **{**SIZES, **overrides})
  x = jax.random.normal(jax.random.key(seed), (B, T, E))
  params = nn.unbox(_run_fast(layer.init, jax.random.key(seed + 1), x))["params"]
  return layer, params, x


def _packed_ids():
  """Row 0: one segment; row 1: segments of 45 and 55 tokens."""
  return jnp.stack([jnp.ones(T, jnp.int32), 1 + (jnp.arange(T) >= 45).astype(jnp.int32)])


@pytest.mark.parametrize("segments, overrides", [
    (True, {}),
    pytest.param(False, {}, marks=pytest.mark.slow),
    pytest.param(True, dict(select_top_n=5, select_local_blocks=1), marks=pytest.mark.slow),
    pytest.param(False, dict(select_top_n=5, select_local_blocks=1), marks=pytest.mark.slow)])
def test_matches_reference(segments, overrides):
  layer, params, x = _setup(**overrides)
  ids = _packed_ids() if segments else None
  got = jax.jit(lambda p, x: layer.apply({"params": p}, x, segment_ids=ids))(params, x)
  want = jax.jit(lambda p, x: nsa_reference(layer, p, x, segment_ids=ids))(params, x)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
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


@pytest.mark.slow
def test_pallas_on_h100_matches_xla():
  """attention_chip='h100': the Mosaic GPU selection kernels (forward; the backward is
  checked in test_nsa_selection) and GPU flash window (interpreted), bfloat16, against the
  xla path with the same parameters. Selection blocks of 64, the GPU kernels' multiple."""
  sizes = dict(head_dim=64, dtype=jnp.bfloat16, attention_chip="h100", select_block=64,
               select_top_n=3)
  layer, params, x = _setup("xla", **sizes)
  ids = _packed_ids()
  x = x.astype(jnp.bfloat16)
  want = _run_fast(lambda x: layer.apply({"params": params}, x, segment_ids=ids), x)
  kernels = NativeSparseAttention(attention_impl="pallas", **{**SIZES, **sizes})
  got = _run_fast(lambda x: kernels.apply({"params": params}, x, segment_ids=ids), x)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.max(np.abs(got - want)) < 3e-2 * max(1.0, np.max(np.abs(want)))


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


@pytest.mark.slow
def test_gradients_finite_and_nonzero():
  layer, params, x = _setup()
  loss = lambda p: jnp.mean(layer.apply({"params": p}, x) ** 2)  # noqa: E731
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    assert np.max(np.abs(g)) > 0, path


@pytest.mark.slow
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


def test_auto_picks_kernels_where_they_take_the_shape():
  resolve = functools.partial(resolve_impl, "auto", head_dim=128, select_block=64, group=16)
  assert resolve(backend="cpu", dtype=jnp.bfloat16) == "xla"
  assert resolve(backend="tpu", dtype=jnp.bfloat16) == "pallas"
  assert resolve(backend="tpu", dtype=jnp.float16) == "xla"
  assert resolve(backend="cuda", dtype=jnp.bfloat16) == "pallas"
  assert resolve(backend="cuda", dtype=jnp.float32) == "xla"
  assert resolve_impl("auto", backend="cuda", dtype=jnp.bfloat16, head_dim=128, select_block=32,
                      group=16) == "xla"
  assert resolve_impl("xla", backend="tpu", dtype=jnp.bfloat16, head_dim=128, select_block=64,
                      group=16) == "xla"


def test_rejects_bad_config():
  with pytest.raises(ValueError, match="select_top_n"):
    _setup(select_top_n=2)
  with pytest.raises(ValueError, match="attention_impl"):
    _setup("cudnn")
  with pytest.raises(ValueError, match="num_heads"):
    _setup(num_heads=3)


def _left_padded(pad: int):
  """Segment ids and positions [B, T] as train.sampling.left_pad makes them: row 1
  starts with `pad` padding slots (segment 0), row 0 has none."""
  ids = np.ones((B, T), np.int32)
  ids[1, :pad] = 0
  positions = np.maximum(np.cumsum(ids, axis=1) - 1, 0).astype(np.int32)
  return jnp.asarray(ids), jnp.asarray(positions)


def _decode(layer, params, x, positions, ids, *, prefill: int, cache_len: int):
  """Prefill `prefill` tokens, then decode the rest one at a time.

  Returns the outputs [B, T, E] and chosen blocks [B, T, k, n], concatenated.
  """
  shapes = jax.eval_shape(lambda: layer.init(
      jax.random.key(0), jnp.zeros((B, cache_len, E)), decode=True))["cache"]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))
  step = jax.jit(lambda cache, x, pos, ids: layer.apply(
      {"params": params, "cache": cache}, x, positions=pos, segment_ids=ids, decode=True,
      mutable=["cache", "intermediates"]))
  outs, chosen = [], []
  for lo, hi in [(0, prefill)] + [(i, i + 1) for i in range(prefill, x.shape[1])]:
    y, state = step(cache, x[:, lo:hi], positions[:, lo:hi], ids[:, lo:hi])
    cache = state["cache"]
    outs.append(y)
    chosen.append(state["intermediates"]["block_indices"][0])
  assert int(cache["cache_index"]) == x.shape[1]
  return jnp.concatenate(outs, axis=1), jnp.concatenate(chosen, axis=1)


@pytest.mark.parametrize("pad", [0, 21])
def test_decode_matches_full_forward(pad):
  """Prefill 30 tokens, then one at a time, into a cache longer than the sequence: the
  outputs (padding rows included) and chosen blocks equal one full forward's. pad=21
  left-pads row 1, so compressed and selection blocks straddle the padding."""
  layer, params, x = _setup(seed=4)
  ids, positions = _left_padded(pad)
  full, state = jax.jit(lambda x: layer.apply(
      {"params": params}, x, positions=positions, segment_ids=ids,
      mutable=["intermediates"]))(x)
  got, chosen = _decode(layer, params, x, positions, ids, prefill=30, cache_len=T + 12)
  np.testing.assert_allclose(got, full, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(chosen, state["intermediates"]["block_indices"][0])


def test_shorter_than_a_compressed_block():
  """t = 6 < compress_block (no compressed block yet, as when sampling a short prompt):
  the layer matches the reference, and decoding matches the full forward."""
  layer, params, x = _setup()
  ids, positions = (a[:, :6] for a in _left_padded(2))
  x = x[:, :6]
  full = _run_fast(lambda x: layer.apply({"params": params}, x, positions=positions,
                                         segment_ids=ids), x)
  want = _run_fast(lambda x: nsa_reference(layer, params, x, positions=positions,
                                           segment_ids=ids), x)
  np.testing.assert_allclose(full, want, atol=2e-5, rtol=2e-5)
  got, _ = _decode(layer, params, x, positions, ids, prefill=3, cache_len=7)
  np.testing.assert_allclose(got, full, atol=2e-5, rtol=2e-5)


def test_decode_sees_a_changed_token_only_from_its_slot_on():
  """Decoding x with token 60 changed matches the full forward of x before slot 60 and
  departs from it at 60 and later (past the window, through compressed blocks)."""
  layer, params, x = _setup(seed=5)
  ids, positions = _left_padded(0)
  full = jax.jit(lambda x: layer.apply({"params": params}, x))(x)
  changed = x.at[:, 60].add(3.0)
  got, _ = _decode(layer, params, changed, positions, ids, prefill=10, cache_len=T)
  np.testing.assert_allclose(got[:, :60], full[:, :60], atol=2e-5, rtol=2e-5)
  diff = np.max(np.abs(np.asarray(got - full)), axis=(0, 2))
  assert diff[60] > 1e-2 and np.min(diff[60:]) > 1e-5, diff[60:]


def test_decode_rejects_more_tokens_than_the_cache():
  layer, params, x = _setup()
  shapes = jax.eval_shape(lambda: layer.init(jax.random.key(0), x[:, :8], decode=True))
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes["cache"]))
  with pytest.raises(ValueError, match="cache of length 8"):
    layer.apply({"params": params, "cache": cache}, x[:, :9], decode=True, mutable=["cache"])
