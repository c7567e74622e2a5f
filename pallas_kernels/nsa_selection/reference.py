"""Plain-jnp selected-block attention (NSA's selection branch): the kernels' oracle.

Legend: layers/__init__.py (h % k == 0; B block length, ns selected blocks per
query).
"""

import jax
import jax.numpy as jnp


def selected_block_attention_reference(q, k, v, block_indices, *, block_size: int,
                                       scale=None, q_segment_ids=None, kv_segment_ids=None,
                                       interpret=False, config=None):
  """Attention of each query over the kv blocks chosen for it, in float32.

  Query i of kv-head group c sees key j iff j lies in one of the blocks
  block_indices[b, i, c, :] (block m holds keys m*B .. m*B + B - 1), j <= i,
  j < s, and (with segment ids) the ids of i and j are equal. Entries outside
  0 .. ceil(s / B) - 1 (e.g. -1) are unused slots. A block listed twice counts
  twice (its keys enter the softmax twice): callers pass distinct blocks.

  Args:
    q: [b, t, h, d]; k, v: [b, s, k, d].
    block_indices: int [b, t, k, ns].
    block_size: B.
    scale: logit scale, default 1 / sqrt(d).
    q_segment_ids, kv_segment_ids: int [b, t] and [b, s], or None.
    interpret, config: accepted for signature parity with the kernel.

  Returns:
    [b, t, h, d] in q.dtype; a query that sees no key gets 0.
  """
  del interpret, config
  b, t, h, d = q.shape
  s, num_kv = k.shape[1], k.shape[2]
  g = h // num_kv
  scale = d ** -0.5 if scale is None else scale
  nb = -(-s // block_size)
  pad = nb * block_size - s
  kp = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
  vp = jnp.pad(v.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
  # [b, k, nb, B, d] blocks, gathered per (query, group, slot): [b, t, k, ns, B, d].
  kb = kp.reshape(b, nb, block_size, num_kv, d).transpose(0, 3, 1, 2, 4)
  vb = vp.reshape(b, nb, block_size, num_kv, d).transpose(0, 3, 1, 2, 4)
  idx = block_indices.astype(jnp.int32)
  valid = (idx >= 0) & (idx < nb)
  idx_c = jnp.clip(idx, 0, nb - 1)
  bi = jnp.arange(b)[:, None, None, None]
  ki = jnp.arange(num_kv)[None, None, :, None]
  k_sel, v_sel = kb[bi, ki, idx_c], vb[bi, ki, idx_c]
  kv_pos = idx_c[..., None] * block_size + jnp.arange(block_size)  # [b, t, k, ns, B]
  q_pos = jnp.arange(t)[None, :, None, None, None]
  mask = valid[..., None] & (kv_pos <= q_pos) & (kv_pos < s)
  if q_segment_ids is not None:
    kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, pad)))
    kv_seg_sel = kv_seg[jnp.arange(b)[:, None, None, None, None], kv_pos]
    mask = mask & (kv_seg_sel == q_segment_ids[:, :, None, None, None])
  qg = q.astype(jnp.float32).reshape(b, t, num_kv, g, d)
  logits = jnp.einsum("btkgd,btknjd->btkgnj", qg, k_sel,
                      precision=jax.lax.Precision.HIGHEST) * scale
  mask = mask[:, :, :, None]  # [b, t, k, 1, ns, B]
  logits = jnp.where(mask, logits, -1e30)
  peak = jnp.max(logits, axis=(-2, -1), keepdims=True)
  p = jnp.where(mask, jnp.exp(logits - peak), 0.0)
  denom = jnp.sum(p, axis=(-2, -1), keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("btkgnj,btknjd->btkgd", p, v_sel, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, t, h, d).astype(q.dtype)
