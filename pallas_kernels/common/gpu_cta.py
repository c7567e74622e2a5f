"""Mosaic GPU (Hopper) attention forward CTA over a tile source, and its online softmax.

A CTA owns COMPUTE_WGS * block_q query rows of one head: COMPUTE_WGS compute
warpgroups of block_q rows each, and a memory warpgroup that streams the k/v
blocks the CTA visits through a ring of `slots` SMEM slots (TMA). Scores are in
log2 units (s * scale * log2 e), the softmax uses exp2, and the stored
log-sum-exp is in log2 units too (the backward CTAs, gpu_cta_bwd, read it).

`forward_cta` takes a tile source that says which kv blocks the CTA visits and
how a tile is masked: flash_attention.gpu.RangeTiles ([lo, hi) and positions)
or block_sparse.gpu.MapTiles (a block map's entries). The source protocol:
num_steps, kv_block(t), needs_mask, mask(...) and extra_streams(wgs).
"""

import dataclasses
import math

from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.common import masking
from pallas_kernels.common.gpu import LOG2E, Ops, Stream, bcast, produce_ring, slot_of

COMPUTE_WGS = 2  # Forward: compute warpgroups per CTA.


def softmax_init(ops: Ops, rows: int, head_dim: int):
  """(acc [rows, d], running max [rows], row sum [rows]) of an online softmax."""
  return (ops.full((rows, head_dim), 0.0), ops.full((rows,), masking.M_INIT),
          ops.full((rows,), 0.0))


def softmax_update(s, acc, m, l):
  """One online-softmax step on masked log2 scores s [rows, cols].

  Returns p (unnormalized probabilities), the rescaled acc, the new max and sum.
  """
  m_next = jnp.maximum(m, s.max(axis=1))
  alpha = jnp.exp2(m - m_next)
  p = jnp.exp2(s - bcast(m_next, s.shape, 0))
  return p, acc * bcast(alpha, acc.shape, 0), m_next, l * alpha + p.sum(axis=1)


def softmax_result(acc, m, l):
  """(acc / l, log2 log-sum-exp); a row that saw no key gets 0 and EMPTY_ROW_LSE."""
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  lse = jnp.where(empty, masking.EMPTY_ROW_LSE, m + jnp.log(safe_l) * (1.0 / math.log(2.0)))
  return acc / bcast(safe_l, acc.shape, 0), lse


@dataclasses.dataclass(frozen=True)
class FwdScratch:
  """SMEM buffers and barriers of a forward CTA (the *_ids ones only with segment ids)."""
  q_smem: object
  k_ring: object
  v_ring: object
  lse_smem: object
  q_bar: object
  k_ready: object
  v_ready: object
  k_consumed: object
  v_consumed: object
  q_ids_smem: object = None
  kv_ids_ring: object = None
  q_ids_bar: object = None
  kv_ids_ready: object = None


def forward_cta(tiles_of, refs, scratch: FwdScratch, *, scale: float, group: int, slots: int,
                ops: Ops):
  """One forward CTA: COMPUTE_WGS compute warpgroups and a memory warpgroup.

  tiles_of(batch, head, cta) -> the CTA's kv tiles (flash_attention.gpu.RangeTiles,
  or block_sparse.gpu.MapTiles).
  refs: (q, k, v, q_seg or None, kv_seg or None, o, lse) GMEM refs.
  """
  q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
  seg = q_seg_ref is not None
  sc = scratch
  bq = sc.q_smem.shape[1]
  head_dim = q_ref.shape[-1]
  b, h = lax.axis_index("batch"), lax.axis_index("heads")
  cta, wg = lax.axis_index("q_tiles"), lax.axis_index("wg")
  source = tiles_of(b, h, cta)

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    ops.set_registers(compute=True)
    q_block = cta * COMPUTE_WGS + wg
    row0 = q_block * bq
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], sc.q_smem.at[wg], sc.q_bar.at[wg])
    q_ids = None
    if seg:
      plgpu.copy_gmem_to_smem(q_seg_ref.at[b, pl.ds(row0, bq)], sc.q_ids_smem.at[wg],
                              sc.q_ids_bar.at[wg])
      plgpu.barrier_wait(sc.q_ids_bar.at[wg])
      q_ids = ops.load_vector(sc.q_ids_smem.at[wg], axis=1)
    plgpu.barrier_wait(sc.q_bar.at[wg])

    def step(t, carry):
      acc, m, l = carry
      slot, s = step_scores(source, sc, t, wg=wg, q_block=q_block, row0=row0, q_ids=q_ids,
                            scale=scale, slots=slots, ops=ops)
      plgpu.barrier_arrive(sc.k_consumed.at[slot])
      p, acc, m_next, l = softmax_update(s, acc, m, l)
      plgpu.barrier_wait(sc.v_ready.at[slot])
      acc = ops.matmul_acc(acc, p.astype(sc.v_ring.dtype), sc.v_ring.at[slot])
      plgpu.barrier_arrive(sc.v_consumed.at[slot])
      return acc, m_next, l

    acc, m, l = lax.fori_loop(0, source.num_steps, step, softmax_init(ops, bq, head_dim))
    out, lse = softmax_result(acc, m, l)
    sc.q_smem.at[wg][...] = out.astype(sc.q_smem.dtype)
    sc.lse_smem.at[wg][...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(sc.q_smem.at[wg], o_ref.at[b, pl.ds(row0, bq), h])
    plgpu.copy_smem_to_gmem(sc.lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _memory():
    ops.set_registers(compute=False)
    stream_kv_tiles(source, (k_ref, v_ref, kv_seg_ref), sc, batch=b, head=h, group=group,
                    slots=slots, wgs=COMPUTE_WGS)


def step_scores(source, scratch, t, *, wg, q_block, row0, q_ids, scale: float, slots: int,
                ops: Ops):
  """Step t of a forward or dq CTA: (ring slot, masked log2 scores [rows, kv]).

  Waits for the step's k block (and kv ids), computes q k^T in log2 units and
  applies the tile source's mask; the caller releases the k slot.
  """
  sc = scratch
  bq, bkv = sc.q_smem.shape[1], sc.k_ring.shape[1]
  kv_block, slot = source.kv_block(t), slot_of(t, slots)
  plgpu.barrier_wait(sc.k_ready.at[slot])
  s = ops.matmul_nt(sc.q_smem.at[wg], sc.k_ring.at[slot], (bq, bkv)) * (scale * LOG2E)
  if source.needs_mask:
    kv_ids = None
    if q_ids is not None:
      plgpu.barrier_wait(sc.kv_ids_ready.at[slot])
      kv_ids = ops.load_vector(sc.kv_ids_ring.at[slot], axis=0)
    s = source.mask(s, t=t, slot=slot, wg=wg, q_block=q_block, q_pos0=row0,
                    kv_block=kv_block, q_ids=q_ids, kv_ids=kv_ids)
  return slot, s


def stream_kv_tiles(source, refs, scratch, *, batch, head, group: int, slots: int, wgs: int):
  """Memory warpgroup of a forward or dq CTA: the source's k, v (and kv id) blocks.

  refs: (k, v, kv_seg or None) GMEM refs; scratch: FwdScratch or DqScratch.
  """
  k_ref, v_ref, kv_seg_ref = refs
  sc, bkv = scratch, scratch.k_ring.shape[1]
  kv_head = lax.div(head, jnp.int32(group))
  rows = lambda t: pl.ds(source.kv_block(t) * bkv, bkv)
  streams = [Stream(lambda t: k_ref.at[batch, rows(t), kv_head], sc.k_ring, sc.k_ready,
                    sc.k_consumed)]
  streams += source.extra_streams(wgs)
  if kv_seg_ref is not None:
    streams.append(Stream(lambda t: kv_seg_ref.at[batch, rows(t)], sc.kv_ids_ring,
                          sc.kv_ids_ready))
  streams.append(Stream(lambda t: v_ref.at[batch, rows(t), kv_head], sc.v_ring, sc.v_ready,
                        sc.v_consumed))
  produce_ring(streams, source.num_steps, slots)
