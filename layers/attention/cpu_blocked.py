"""Causal self-attention in query blocks with a hand-written backward (the CPU path).

`implementations.xla_attention`, the reference, computes the [b, k, g, t, s]
scores of the whole sequence, keeps the float32 probabilities for the backward
pass, and leaves autodiff to take dots of a float32 and a bfloat16 operand,
which XLA:CPU runs by converting the big float32-sized side. Here the queries
go in `num_blocks` blocks:

- block i (queries [start, end)) meets only keys [0, end), the rest being
  masked by causality anyway: with 4 blocks, 5/8 of the scores are computed,
  and each block's scores are small enough to stay in cache;
- the backward recomputes each block's probabilities from the saved row
  maxima and sums instead of keeping them;
- a dot whose operands share the input dtype runs as dtype x dtype -> float32
  (native on XLA:CPU); a dot with the float32 score gradient upcasts its small
  [b, s, k, d] operand, as autodiff of the reference does.

The values are the reference's up to float32 rounding and summation order, on
rows with a nonzero segment; padding rows (segment 0) are finite but
meaningless in both (here the average of their block's keys).

Shapes: b batch, t sequence, h query heads, k kv heads, g = h / k, d head dim;
q [b, t, h, d], k/v [b, t, k, d], segment ids int [b, t].
"""

import functools

import jax
import jax.numpy as jnp

_NEG = jnp.finfo(jnp.float32).min


def _blocks(t: int, num_blocks: int) -> list[tuple[int, int]]:
  size = -(-t // num_blocks)
  return [(start, min(start + size, t)) for start in range(0, t, size)]


def _mask(start: int, end: int, segment_ids, sliding_window: int = 0):
  """bool [b or 1, end - start, end]: query start + i may attend key j."""
  q_slot, k_slot = jnp.arange(start, end)[:, None], jnp.arange(end)[None, :]
  mask = k_slot <= q_slot
  if sliding_window:
    mask = mask & (q_slot - k_slot < sliding_window)
  mask = mask[None]
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids[0][:, start:end], segment_ids[1][:, :end]
    mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
  return mask


def _scores(q_block, keys, mask, scale):
  """q [b, B, k, g, d] x keys [b, e, k, d] -> float32 [b, k, g, B, e], masked."""
  scores = jnp.einsum("btkgd,bskd->bkgts", q_block, keys, preferred_element_type=jnp.float32)
  return jnp.where(mask[:, None, None], scores * scale, _NEG)


def _grouped(x, num_kv):
  """[b, t, h, d] -> [b, t, k, g, d]."""
  b, t, h, d = x.shape
  return x.reshape(b, t, num_kv, h // num_kv, d)


def _forward(q, k, v, segment_ids, num_blocks, sliding_window):
  b, t, h, d = q.shape
  scale = d ** -0.5
  qg = _grouped(q, k.shape[2])
  outs, stats = [], []
  for start, end in _blocks(t, num_blocks):
    mask = _mask(start, end, segment_ids, sliding_window)
    scores = _scores(qg[:, start:end], k[:, :end], mask, scale)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    unnormalized = jnp.exp(scores - peak)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    probs = (unnormalized / total).astype(v.dtype)
    outs.append(jnp.einsum("bkgts,bskd->btkgd", probs, v[:, :end],
                           preferred_element_type=jnp.float32))
    stats.append((peak, total))
  out = jnp.concatenate(outs, axis=1).reshape(b, t, h, d).astype(q.dtype)
  return out, stats


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     q_segment_ids: jax.Array | None = None,
                     kv_segment_ids: jax.Array | None = None, num_blocks: int = 4,
                     sliding_window: int = 0) -> jax.Array:
  """Causal self-attention with optional segments, queries in `num_blocks` blocks.

  Args:
    q: [b, t, h, d]; k, v: [b, t, k, d], all of one dtype.
    q_segment_ids, kv_segment_ids: int [b, t] each, or both None for one
      unpadded segment per row.
    num_blocks: query blocks (the last may be shorter).
    sliding_window: > 0 limits query i to keys i - sliding_window + 1 .. i.
  Returns:
    [b, t, h, d] in q.dtype.
  """
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"causal_attention is self-attention: {q.shape[1]} queries, "
                     f"{k.shape[1]} keys.")
  segment_ids = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
  return _causal_attention(q, k, v, segment_ids, num_blocks, sliding_window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _causal_attention(q, k, v, segment_ids, num_blocks, sliding_window):
  return _forward(q, k, v, segment_ids, num_blocks, sliding_window)[0]


def _causal_attention_fwd(q, k, v, segment_ids, num_blocks, sliding_window):
  out, stats = _forward(q, k, v, segment_ids, num_blocks, sliding_window)
  return out, (q, k, v, segment_ids, stats)


def _causal_attention_bwd(num_blocks, sliding_window, residuals, g):
  q, k, v, segment_ids, stats = residuals
  b, t, h, d = q.shape
  num_kv = k.shape[2]
  scale = d ** -0.5
  qg, gg = _grouped(q, num_kv), _grouped(g.astype(q.dtype), num_kv)
  k32 = k.astype(jnp.float32)
  dq_blocks = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for (start, end), (peak, total) in zip(_blocks(t, num_blocks), stats):
    q_block, g_block = qg[:, start:end], gg[:, start:end]
    mask = _mask(start, end, segment_ids, sliding_window)[:, None, None]
    scores = _scores(q_block, k[:, :end], mask[:, 0, 0], scale)
    probs = jnp.exp(scores - peak) / total  # As in the forward pass.
    dv = dv.at[:, :end].add(jnp.einsum("bkgts,btkgd->bskd", probs.astype(v.dtype), g_block,
                                       preferred_element_type=jnp.float32))
    d_probs = jnp.einsum("btkgd,bskd->bkgts", g_block, v[:, :end],
                         preferred_element_type=jnp.float32)
    d_scores = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
    d_scores = jnp.where(mask, d_scores * scale, 0.0)  # Padding rows: all masked, like the reference.
    dq_blocks.append(jnp.einsum("bkgts,bskd->btkgd", d_scores, k32[:, :end]))
    dk = dk.at[:, :end].add(jnp.einsum("bkgts,btkgd->bskd", d_scores,
                                       q_block.astype(jnp.float32)))
  dq = jnp.concatenate(dq_blocks, axis=1).reshape(b, t, h, d)
  no_segment_grads = None if segment_ids is None else (None, None)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), no_segment_grads


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)
