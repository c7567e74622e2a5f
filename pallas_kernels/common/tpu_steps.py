"""Mosaic TPU online softmax: the forward tile steps every TPU attention kernel shares.

A kernel keeps a running max m and row sum l ([rows, 128] f32, lane-replicated)
and an f32 output accumulator [rows, d] in VMEM scratch: softmax_init at its
first step, softmax_step per visited tile, softmax_finish at its last. Scores
are in log2 units (s * scale * log2 e), so the softmax uses exp2 and the stored
log-sum-exp is in log2 units too (tpu_steps_bwd reads it).
"""

import math

from jax import lax
import jax.numpy as jnp

from pallas_kernels.common import masking
from pallas_kernels.common.tpu import LOG2E, SUBLANES, widen


def log2_scores(q, k, scale: float):
  """f32 [bq, bkv] = q @ k.T * scale * log2(e) (scores in log2 units)."""
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return s * (scale * LOG2E)


def softmax_init(m_ref, l_ref, acc_ref):
  """Running max, row sum and output accumulator of an online softmax."""
  m_ref[...] = jnp.full(m_ref.shape, masking.M_INIT, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def softmax_step(s, v, m_ref, l_ref, acc_ref):
  """One online-softmax step: s [bq, bkv] masked log2 scores, v [bkv, d]."""
  bkv = s.shape[1]
  m_prev, l_prev = m_ref[...], l_ref[...]  # [bq, 128]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp2(m_prev - m_next)
  p = jnp.exp2(s - widen(m_next, bkv))
  m_ref[...] = m_next
  l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32)
  acc_ref[...] = acc_ref[...] * widen(alpha, acc_ref.shape[1]) + pv


def softmax_finish(o_ref, lse_ref, m_ref, l_ref, acc_ref):
  """Normalized output and [8, bq] log2 log-sum-exp rows; empty rows get 0 / EMPTY_ROW_LSE."""
  l, m = l_ref[...], m_ref[...]
  empty = l == 0.0
  inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
  o_ref[...] = (acc_ref[...] * widen(inv, acc_ref.shape[1])).astype(o_ref.dtype)
  lse = jnp.where(empty, masking.EMPTY_ROW_LSE,
                  m + jnp.log(jnp.where(empty, 1.0, l)) * (1.0 / math.log(2.0)))
  lse_ref[...] = jnp.transpose(lse)[:SUBLANES]  # [8, bq] rows
