"""Mosaic TPU attention backward: the dq and dk/dv tile steps every TPU kernel shares.

Probabilities are recomputed from the forward's log-sum-exp (log2 units):
p = exp2(s - lse), dp = do v^T, ds = p (dp - delta) with delta = rowsum(do o),
dq = scale ds k, dk = scale ds^T q, dv = p^T do.

A dq kernel accumulates [rows, d] in f32 (dq_init, dq_step per tile,
dq_finish). A dk/dv kernel works on transposed tiles (kv rows, q columns), so
its per-query statistics are [1, cols] rows (dkv_init, dkv_step, dkv_finish).
"""

from jax import lax
import jax.numpy as jnp

from pallas_kernels.common.tpu import LANES, LOG2E, widen

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def dq_init(acc_ref, lse_col, delta_col, lse_ref, delta_ref):
  """Zeroes the dq accumulator [rows, d]; [8, rows] lse/delta rows become [rows, 128] columns."""
  rows = acc_ref.shape[0]
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
  lse_col[...] = jnp.transpose(jnp.broadcast_to(lse_ref[:1, :], (LANES, rows)))
  delta_col[...] = jnp.transpose(jnp.broadcast_to(delta_ref[:1, :], (LANES, rows)))


def dq_finish(dq_ref, acc_ref, scale: float):
  dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def dkv_init(dk_acc, dv_acc):
  dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
  dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)


def dkv_finish(dk_ref, dv_ref, dk_acc, dv_acc, scale: float):
  dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def dq_step(q, k, v, do, lse_col, delta_col, acc_ref, *, scale: float, mask):
  """acc_ref [bq, d] += ds @ k for one tile; lse/delta [bq, 128] columns; mask None or [bq, bkv]."""
  bkv = k.shape[0]
  s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)
  p = jnp.exp2(s * (scale * LOG2E) - widen(lse_col, bkv))
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
  ds = p * (dp - widen(delta_col, bkv))
  acc_ref[...] += lax.dot_general(ds.astype(k.dtype), k, _NN,
                                  preferred_element_type=jnp.float32)


def dkv_step(q, k, v, do, lse_row, delta_row, dk_acc, dv_acc, *, scale: float, mask):
  """dk/dv accumulators [bkv, d] += one transposed tile.

  lse/delta are [1, bq] rows; mask is None or [bkv, bq].
  """
  s_t = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32)  # [bkv, bq]
  p_t = jnp.exp2(s_t * (scale * LOG2E) - lse_row)
  if mask is not None:
    p_t = jnp.where(mask, p_t, 0.0)
  dv_acc[...] += lax.dot_general(p_t.astype(do.dtype), do, _NN,
                                 preferred_element_type=jnp.float32)
  dp_t = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
  ds_t = p_t * (dp_t - delta_row)
  dk_acc[...] += lax.dot_general(ds_t.astype(q.dtype), q, _NN,
                                 preferred_element_type=jnp.float32)
