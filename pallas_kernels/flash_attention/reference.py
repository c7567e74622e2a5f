"""Plain-jnp attention with the flash-attention signature: the kernels' oracle.

Legend: layers/__init__.py (h % k == 0).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.common import masking


def attention_reference(q, k, v, *, causal=False, q_segment_ids=None,
                        kv_segment_ids=None, local_window_size=None, scale=None,
                        interpret=False, config=None):
  """Masked softmax attention computed in float32 with the whole score matrix.

  Args:
    q: [b, t, h, d]; k, v: [b, s, k, d].
    causal: query i sees key j only if j <= i.
    q_segment_ids, kv_segment_ids: int [b, t] and [b, s] or None; query i sees
      key j only if their ids are equal.
    local_window_size: None, an int w (= (w, w)) or (left, right): query i sees
      key j only if i - left <= j <= i + right (jax.nn.dot_product_attention).
    scale: logit scale, default 1 / sqrt(d).
    interpret, config: accepted for signature parity with flash_attention.

  Returns:
    [b, t, h, d] in q.dtype. Rows that see no key are 0.
  """
  del interpret, config
  b, t, h, d = q.shape
  s, num_kv = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  window = masking.normalize_window(local_window_size, causal)
  q32 = q.astype(jnp.float32).reshape(b, t, num_kv, h // num_kv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q32, k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * scale
  mask = masking.visible(
      jnp.arange(t)[:, None], jnp.arange(s)[None, :], window=window, kv_len=s)
  mask = jnp.broadcast_to(mask, (b, t, s))
  if q_segment_ids is not None:
    mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  mask = mask[:, None, None]  # [b, 1, 1, t, s]
  logits = jnp.where(mask, logits, -1e30)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(logits - peak), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, t, h, d).astype(q.dtype)
