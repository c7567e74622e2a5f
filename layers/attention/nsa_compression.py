"""NSA's compression branch and block selection (arXiv 2502.11089, sections 3.3.1-3.3.2).

Shapes: see layers/__init__.py (here b, t, s, h, k, g, d, m; l compress_block,
st compress_stride, nc compressed blocks, B select_block, nb = ceil(s / B)
selection blocks, ns selected blocks per query).

Compressed block j covers tokens j*st .. j*st + l - 1 (only whole blocks: j <
nc = (t - l) // st + 1) and becomes one key and one value. Query i sees
compressed block j iff the block ends at or before i (and, with segment ids,
lies wholly inside i's segment).

Decoding: the masks and the selection also serve t new queries at slots
q_offset .. q_offset + t - 1 of a KV cache of s slots (kv_len=s,
kv_segment_ids [b, s] the cache's ids); blocks are always counted in cache
slots, so a decode step sees exactly what a full forward over the same slots sees.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

_COMPRESSED_AXES = ("batch", "compressed_length", "kv_heads", "head_dim")


def num_compressed(t: int, block: int, stride: int) -> int:
  """nc: whole compressed blocks in a sequence of t tokens."""
  return 0 if t < block else (t - block) // stride + 1


class CompressKV(nn.Module):
  """phi: one key (or value) per compressed block, from the block's l tokens.

  phi(block) = gelu((x + pos) W1) W2 with x the block's per-token keys [l, d],
  pos a learned intra-block position encoding [l, k, d] (per kv head), W1
  [l, d, m] contracting the whole block, W2 [m, d]; m = hidden (default d).
  W1, W2 are shared by the kv heads.

  Attributes:
    block: l; stride: st; hidden: m (None: head dim).
    dtype, param_dtype: computation and parameter dtypes.
  """
  block: int
  stride: int
  hidden: int | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, blocks: jax.Array | None = None) -> jax.Array:
    """x [b, t, k, d] -> [b, nc, k, d]; or only the blocks `blocks` (one row per id).

    blocks: int block ids, 1-D (may be traced, as when decoding); tokens past
    t - 1 are clamped, so a block that is not whole gives a meaningless row.
    """
    _, t, k, d = x.shape
    m = self.hidden or d
    pos = self.param("pos", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("compress_block", "kv_heads", "head_dim")),
                     (self.block, k, d), self.param_dtype)
    w1 = self.param("w1", nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                         in_axis=(0, 1), out_axis=2),
        ("compress_block", "head_dim", "compress_mlp")), (self.block, d, m), self.param_dtype)
    w2 = self.param("w2", nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
        ("compress_mlp", "head_dim")), (m, d), self.param_dtype)
    x, pos, w1, w2 = promote_dtype(x, pos, w1, w2, dtype=self.dtype)
    if blocks is None:
      blocks = np.arange(num_compressed(t, self.block, self.stride))
    token = blocks[:, None] * self.stride + np.arange(self.block)  # [nc, l]
    tokens = x[:, jnp.minimum(token, t - 1)] + pos  # [b, nc, l, k, d]
    hidden = nn.gelu(jnp.einsum("bclkd,ldm->bckm", tokens, w1))
    out = jnp.einsum("bckm,md->bckd", hidden, w2)
    return nn.with_logical_constraint(out, _COMPRESSED_AXES)


def grouped_attention(q, k, v, mask):
  """Masked GQA softmax attention that also returns its probabilities.

  Args:
    q: [b, t, h, d]; k, v: [b, s, k, d]; mask: bool [b, k or 1, t, s].

  Returns:
    out [b, t, h, d] in q.dtype (0 for rows that see nothing) and probs
    float32 [b, k, g, t, s].
  """
  b, t, h, d = q.shape
  num_kv = k.shape[2]
  qg = q.reshape(b, t, num_kv, h // num_kv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  mask = mask[:, :, None]
  logits = jnp.where(mask, logits * d ** -0.5, jnp.finfo(jnp.float32).min)
  peak = jax.lax.stop_gradient(
      jnp.max(logits, axis=-1, keepdims=True, initial=jnp.finfo(jnp.float32).min))
  p = jnp.where(mask, jnp.exp(logits - peak), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  probs = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d).astype(q.dtype), probs


def segment_starts(segment_ids, t: int):
  """int32 [b, t]: slot of the first token of each token's segment (0 without ids)."""
  if segment_ids is None:
    return jnp.zeros((1, t), jnp.int32)
  slots = jnp.arange(t, dtype=jnp.int32)
  new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                         segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return jax.lax.cummax(jnp.where(new, slots, 0), axis=1)


def _query_slots(t: int, q_offset):
  """int32 [t]: cache slots of the queries."""
  return q_offset + jnp.arange(t, dtype=jnp.int32)


def compressed_mask(t: int, block: int, stride: int, segment_ids=None, *, kv_len=None,
                    q_offset=0, kv_segment_ids=None):
  """bool [b or 1, 1, t, nc]: query i (at slot q_offset + i) sees compressed block j.

  Args:
    t: queries; block, stride: l, st.
    segment_ids: the queries' ids [b, t] or None (one segment).
    kv_len: s, the slots the blocks are cut from (default t).
    q_offset: slot of the first query (int or traced scalar).
    kv_segment_ids: [b, s] ids of the slots (default segment_ids).
  """
  s = t if kv_len is None else kv_len
  kv_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
  nc = num_compressed(s, block, stride)
  first = np.arange(nc) * stride
  last = first + block - 1
  mask = (jnp.asarray(last)[None, :] <= _query_slots(t, q_offset)[:, None])[None]
  if segment_ids is not None:
    seg_first, seg_last = kv_ids[:, first], kv_ids[:, last]
    same = (seg_first == seg_last)[:, None, :] & (seg_first[:, None, :] == segment_ids[:, :, None])
    mask = mask & same
  return mask[:, None]


def overlap_weights(t: int, block: int, stride: int, select_block: int) -> np.ndarray:
  """float32 [nc, nb]: tokens compressed block i shares with selection block j, / stride.

  The paper's eq. 9 up to its index convention: with l = 32, st = 16, B = 64,
  selection block j gathers compressed blocks 4j-1 .. 4j+3 with weights
  1, 2, 2, 2, 1.
  """
  nc = num_compressed(t, block, stride)
  nb = -(-t // select_block)
  first = np.arange(nc)[:, None] * stride
  lo = np.maximum(first, np.arange(nb)[None, :] * select_block)
  hi = np.minimum(first + block, (np.arange(nb)[None, :] + 1) * select_block)
  return (np.maximum(hi - lo, 0) / stride).astype(np.float32)


def select_blocks(probs, *, t: int, block: int, stride: int, select_block: int, top_n: int,
                  local_blocks: int, segment_ids=None, kv_len=None, q_offset=0,
                  kv_segment_ids=None):
  """The top-ns selection blocks per (query, kv head) from compressed-branch probabilities.

  Importance of selection block j for query i and a kv head: the compressed
  probabilities of the group's g heads, summed, mapped with overlap_weights.
  Always chosen: the block holding the first token of i's segment (block 0
  without segment ids), i's own block and the local_blocks - 1 before it.
  Never chosen: blocks starting after i or ending before i's segment. No
  gradient flows through the choice.

  Args:
    probs: float32 [b, k, g, t, nc], nc = num_compressed(s).
    segment_ids, kv_len, q_offset, kv_segment_ids: as in `compressed_mask`.

  Returns:
    int32 [b, t, k, ns] with ns = min(top_n, nb), nb = ceil(s / B): distinct
    block ids, -1 for unused slots (fewer than ns eligible blocks).
  """
  s = t if kv_len is None else kv_len
  kv_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
  nb = -(-s // select_block)
  ns = min(top_n, nb)
  w = jnp.asarray(overlap_weights(s, block, stride, select_block))
  score = jnp.einsum("bkgtc,cu->btku", jax.lax.stop_gradient(probs), w,
                     precision=jax.lax.Precision.HIGHEST)
  own = (_query_slots(t, q_offset) // select_block)[None, :, None]  # [1, t, 1]
  starts = segment_starts(kv_ids, s)  # [b or 1, s]
  starts = jax.lax.dynamic_slice_in_dim(starts, q_offset, t, axis=1)
  first = (starts // select_block)[:, :, None]  # [b or 1, t, 1]
  blocks = jnp.arange(nb, dtype=jnp.int32)
  eligible = (blocks <= own) & (blocks >= first)  # [b or 1, t, nb]
  forced = (blocks == first) | ((blocks <= own) & (blocks > own - local_blocks))
  forced = (forced & eligible)[:, :, None]
  eligible = eligible[:, :, None]
  score = jnp.where(forced, jnp.inf, jnp.where(eligible, score, -jnp.inf))
  values, idx = jax.lax.top_k(score, ns)
  return jnp.where(values > -jnp.inf, idx, -1).astype(jnp.int32)


def selection_mask(block_indices, *, t: int, select_block: int, segment_ids=None, kv_len=None,
                   q_offset=0, kv_segment_ids=None):
  """bool [b, k, t, s]: query i sees slot j of its selected blocks (causal, segments).

  block_indices: int [b, t, k, ns]; the other arguments as in `compressed_mask`.
  """
  s = t if kv_len is None else kv_len
  kv_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
  nb = -(-s // select_block)
  chosen = jnp.any(block_indices[..., None] == jnp.arange(nb), axis=-2)  # [b, t, k, nb]
  keys = jnp.repeat(chosen, select_block, axis=-1)[..., :s]  # [b, t, k, s]
  causal = jnp.arange(s)[None, :] <= _query_slots(t, q_offset)[:, None]
  mask = keys & causal[None, :, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == kv_ids[:, None, :])[:, :, None]
  return mask.transpose(0, 2, 1, 3)
