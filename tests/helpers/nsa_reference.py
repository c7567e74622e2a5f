"""Plain-jnp Native Sparse Attention, written from the paper for testing `NativeSparseAttention`.

Everything is float32 at HIGHEST precision with whole [t, t] masks built
token by token; no code is shared with layers/attention/nsa.py or nsa_compression.py
beyond RoPE.

Shapes: see layers/__init__.py (here b, t, e, h, k, g, d; l compress_block,
st compress_stride, nc compressed blocks, B select_block (`sb` in the code),
nb = ceil(t / B) selection blocks, ns selected blocks per query).
"""

import jax
import jax.numpy as jnp
import numpy as np

from layers.rope import apply_rope

_HI = jax.lax.Precision.HIGHEST


def _softmax_rows(logits, mask):
  """Softmax over the last axis within mask; rows without any True are 0."""
  logits = jnp.where(mask, logits, -jnp.inf)
  peak = jnp.max(jnp.where(mask, logits, -1e30), axis=-1, keepdims=True, initial=-1e30)
  p = jnp.where(mask, jnp.exp(logits - peak), 0.0)
  total = p.sum(axis=-1, keepdims=True)
  return p / jnp.where(total > 0, total, 1.0)


def _attend(q, k, v, mask):
  """q [b, t, h, d], k/v [b, s, k, d], mask [b, k, t, s] -> out [b, t, h, d], p [b, h, t, s]."""
  b, t, h, d = q.shape
  group = h // k.shape[2]
  k_h, v_h = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q, k_h, precision=_HI) / np.sqrt(d)
  p = _softmax_rows(logits, jnp.repeat(mask, group, axis=1))
  return jnp.einsum("bhts,bshd->bthd", p, v_h, precision=_HI), p


def _compress(p, x, stride: int):
  """CompressKV by the definition: one MLP call per block. x [b, t, k, d] -> [b, nc, k, d]."""
  block = p["pos"].shape[0]
  t = x.shape[1]
  outs = []
  for start in range(0, t - block + 1, stride):
    z = x[:, start:start + block] + p["pos"]  # [b, l, k, d]
    hidden = jax.nn.gelu(jnp.einsum("blkd,ldf->bkf", z, p["w1"], precision=_HI))
    outs.append(jnp.einsum("bkf,fd->bkd", hidden, p["w2"], precision=_HI))
  if not outs:
    return jnp.zeros((x.shape[0], 0, *x.shape[2:]), jnp.float32)
  return jnp.stack(outs, axis=1)


def nsa_reference(layer, params, x, positions=None, segment_ids=None, return_indices=False):
  """NSA forward of `layer` (a NativeSparseAttention, for its fields) with `params`.

  Args:
    layer: the module whose fields give the sizes.
    params: its 'params' collection (unboxed).
    x: [b, t, e]; positions, segment_ids: int [b, t] or None.
    return_indices: also return the chosen blocks as a bool [b, t, k, nb] set.

  Returns:
    [b, t, e] float32 (and the chosen-block sets).
  """
  b, t, _ = x.shape
  h, num_kv = layer.num_heads, layer.num_kv_heads
  l, st, sb = layer.compress_block, layer.compress_stride, layer.select_block
  x = x.astype(jnp.float32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
  def proj(name):
    return jnp.einsum("bte,e...->bt...", x, params[name]["kernel"], precision=_HI)
  rope = lambda y: apply_rope(y, positions, layer.rope_theta)  # noqa: E731
  q = rope(proj("query"))
  pos_i, pos_j = np.arange(t)[:, None], np.arange(t)[None, :]
  same_seg = seg[:, :, None] == seg[:, None, :]  # [b, t, t]

  # Compressed branch.
  ck = _compress(params["compress_key"], rope(proj("key_cmp")), st)
  cv = _compress(params["compress_value"], proj("value_cmp"), st)
  nc = ck.shape[1]
  cover = np.zeros((nc, t), bool)  # cover[j, tau]: token tau lies in compressed block j
  for ci in range(nc):
    cover[ci, ci * st:ci * st + l] = True
  ends = np.array([ci * st + l - 1 for ci in range(nc)], np.int64)
  # Block j is visible to query i: it ends at or before i, and every token shares i's segment.
  inside = jnp.all(jnp.where(cover[None, None], same_seg[:, :, None, :], True), axis=-1)
  cmp_mask = (ends[None, :] <= np.arange(t)[:, None])[None] & inside  # [b, t, nc]
  cmp_mask = jnp.broadcast_to(cmp_mask[:, None], (b, num_kv, t, nc))
  out_cmp, p_cmp = _attend(q, ck, cv, cmp_mask)

  # Selection: token importance = sum of covering compressed blocks' probs / stride.
  nb = -(-t // sb)
  token_imp = jnp.einsum("bhtc,cs->bhts", p_cmp, cover.astype(np.float32), precision=_HI) / st
  pad = nb * sb - t
  block_imp = jnp.pad(token_imp, ((0, 0), (0, 0), (0, 0), (0, pad))).reshape(b, h, t, nb, sb)
  score = block_imp.sum(-1).reshape(b, num_kv, h // num_kv, t, nb).sum(2)  # [b, k, t, nb]
  # A segment starts at the first slot with as many id changes before it as slot i.
  changes = jnp.pad(jnp.cumsum(seg[:, 1:] != seg[:, :-1], axis=1), ((0, 0), (1, 0)))
  seg_start = jnp.argmax(changes[:, None, :] == changes[:, :, None], axis=-1)  # [b, t]
  own = pos_i // sb  # [t, 1]
  first = (seg_start // sb)[:, :, None]  # [b, t, 1]
  blocks = np.arange(nb)[None, None, :]
  eligible = (blocks <= own[None]) & (blocks >= first)
  forced = eligible & ((blocks == first) | (blocks > own[None] - layer.select_local_blocks))
  score = jnp.where(forced[:, None], jnp.inf, jnp.where(eligible[:, None], score, -jnp.inf))
  ns = min(layer.select_top_n, nb)
  order = jnp.argsort(-score, axis=-1, stable=True)[..., :ns]
  picked = jnp.take_along_axis(score, order, axis=-1) > -jnp.inf
  chosen = jnp.zeros((b, num_kv, t, nb), bool)
  chosen = jax.vmap(jax.vmap(jax.vmap(lambda z, o, ok: z.at[o].max(ok))))(chosen, order, picked)
  key_chosen = jnp.repeat(chosen, sb, axis=-1)[..., :t]  # [b, k, t, t]
  causal = (pos_j <= pos_i)[None, None]
  slc_mask = key_chosen & causal & same_seg[:, None]
  out_slc, _ = _attend(q, rope(proj("key_slc")), proj("value_slc"), slc_mask)

  # Sliding window.
  win = causal & (pos_j > pos_i - layer.window)[None, None] & same_seg[:, None]
  win = jnp.broadcast_to(win, (b, num_kv, t, t))
  out_win, _ = _attend(q, rope(proj("key_win")), proj("value_win"), win)

  gate = jax.nn.sigmoid(proj("gate"))  # [b, t, h, 3]
  out = (gate[..., 0:1] * out_cmp + gate[..., 1:2] * out_slc + gate[..., 2:3] * out_win)
  y = jnp.einsum("bthd,hde->bte", out, params["out"]["kernel"], precision=_HI)
  return (y, chosen.transpose(0, 2, 1, 3)) if return_indices else y
