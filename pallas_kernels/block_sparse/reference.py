"""Plain-jnp block-sparse attention: the kernels' oracle (dense [t, s] mask).

Legend: layers/__init__.py (h % k == 0).
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse.block_map import BlockMap, mask_heads_for
from pallas_kernels.block_sparse.masks import Mask


def dense_mask(mask, q_len: int, kv_len: int, num_q_heads: int, num_kv_heads: int):
  """bool [h or 1, t, s]: the mask per query head (1 when shared by all)."""
  which = mask_heads_for(mask, num_q_heads, num_kv_heads)
  if which == "shared":
    return mask.dense(q_len, kv_len)[None]
  dense = mask.dense(q_len, kv_len, num_heads=mask.num_heads)
  if which == "kv":
    dense = np.repeat(dense, num_q_heads // num_kv_heads, axis=0)
  return dense


def block_sparse_attention_reference(q, k, v, mask, *, q_segment_ids=None,
                                     kv_segment_ids=None, scale=None, interpret=False,
                                     config=None):
  """Masked softmax attention in float32 with the whole score matrix.

  Args:
    q: [b, t, h, d]; k, v: [b, s, k, d].
    mask: a Mask, or a BlockMap (its mask is used).
    q_segment_ids, kv_segment_ids: int [b, t], [b, s] or None; combine with the
      mask (a pair is visible only if the ids are equal too).
    scale: logit scale, default 1 / sqrt(d).
    interpret, config: accepted for signature parity with block_sparse_attention.

  Returns:
    [b, t, h, d] in q.dtype. Rows that see no key are 0.
  """
  del interpret, config
  if isinstance(mask, BlockMap):
    mask = mask.mask
  if not isinstance(mask, Mask):
    raise ValueError(f"mask={mask!r} must be a Mask or a BlockMap.")
  b, t, h, d = q.shape
  s, num_kv = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  q32 = q.astype(jnp.float32).reshape(b, t, num_kv, h // num_kv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q32, k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * scale
  visible = jnp.asarray(dense_mask(mask, t, s, h, num_kv))  # [h or 1, t, s]
  visible = visible.reshape(1, -1, h // num_kv if visible.shape[0] > 1 else 1, t, s)
  if q_segment_ids is not None:
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    visible = visible & same[:, None, None]
  logits = jnp.where(visible, logits, -1e30)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(visible, jnp.exp(logits - peak), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, t, h, d).astype(q.dtype)
