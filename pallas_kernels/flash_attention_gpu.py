"""Mosaic GPU (Hopper) flash attention forward: TMA ring, wgmma, warp specialization.

Layout is the public one, q [b, t, h, d] and k/v [b, s, k, d] (t, s padded to
whole blocks, d a multiple of 64); TMA reads a (rows, d) slab of one head
straight from it. A CTA owns 2 * block_q query rows of one head: two compute
warpgroups of block_q rows each, and a memory warpgroup that streams the k/v
blocks [kv_lo, kv_hi) of the CTA through a ring of `max_concurrent_steps` SMEM
slots. Tiles that are not wholly visible (causal edge, window edge, padded
keys, mixed segments) are masked; the rest skip the mask.

Scores are in log2 units (s * scale * log2 e), softmax uses exp2; the stored
log-sum-exp is in log2 units too (the backward kernels read it).
"""

import functools
import math

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import flash_attention_masks as masks
from pallas_kernels.flash_attention_gpu_ops import (TRANSFORMS, Ops, Stream, bcast,
                                                    produce_ring, slot_of)
from pallas_kernels.flash_attention_masks import Tiling

LOG2E = math.log2(math.e)
COMPUTE_WGS = 2  # Forward: compute warpgroups per CTA.


def gpu_ranges(tiling: Tiling, batch: int, q_seg, kv_seg, *, q_rows: int, kv_rows: int):
  """Visited block ranges per CTA and per-block segment statistics (XLA side).

  A CTA covers q_rows query rows (forward, dq) or kv_rows key rows (dk/dv).

  Returns:
    (lo, hi) int32 [b, tq // q_rows]: kv blocks of kv_rows each q CTA visits;
    (lo, hi) int32 [b, tk // kv_rows]: q blocks of q_rows each kv CTA visits;
    seg_stats: (q_min, q_max) [b, nq] per tiling.block_q rows and
    (kv_min, kv_max) [b, nk] per tiling.block_kv rows, or ().
  """
  stats, cta_stats = (), None
  if tiling.has_segments:
    stats = (*masks.segment_block_stats(q_seg, tiling.block_q),
             *masks.segment_block_stats(kv_seg, tiling.block_kv))
    cta_stats = (*masks.segment_block_stats(q_seg, q_rows),
                 *masks.segment_block_stats(kv_seg, kv_rows))
  kv_range, q_range, _, _ = masks.block_ranges(
      batch, tiling.padded_q_len // q_rows, tiling.padded_kv_len // kv_rows,
      block_q=q_rows, block_kv=kv_rows, window=tiling.window, seg_stats=cta_stats)
  return kv_range, q_range, stats


def tile_is_full(tiling: Tiling, q_block, kv_block, seg_stat_refs, batch):
  """Traced bool: tile (q_block, kv_block) at tiling's block sizes needs no mask."""
  full = masks.tile_fully_visible(
      q_block, kv_block, block_q=tiling.block_q, block_kv=tiling.block_kv,
      window=tiling.window, kv_len=tiling.kv_len, padded_kv_len=tiling.padded_kv_len)
  if seg_stat_refs:
    q_min, q_max, kv_min, kv_max = seg_stat_refs
    full = full & masks.segments_uniform(q_min[batch, q_block], q_max[batch, q_block],
                                         kv_min[batch, kv_block], kv_max[batch, kv_block])
  return jnp.asarray(full, jnp.bool_)


def mask_scores(s, *, tiling: Tiling, ops: Ops, q_pos0, kv_pos0, q_ids, kv_ids,
                transposed: bool):
  """-inf where not visible. s is [q, kv] (or [kv, q] when transposed)."""
  shape = s.shape
  q_axis, kv_axis = (1, 0) if transposed else (0, 1)
  q_pos = q_pos0 + ops.iota(shape, q_axis)
  kv_pos = kv_pos0 + ops.iota(shape, kv_axis)
  mask = masks.visible(q_pos, kv_pos, window=tiling.window, kv_len=tiling.padded_kv)
  if q_ids is not None:
    mask = mask & segment_mask(q_ids, kv_ids, shape, transposed)
  return jnp.where(mask, s, -jnp.inf)


def segment_mask(q_ids, kv_ids, shape, transposed: bool):
  """bool tile: query and key share a segment (ids are per-row / per-column vectors)."""
  q_axis, kv_axis = (1, 0) if transposed else (0, 1)
  return bcast(q_ids, shape, q_axis) == bcast(kv_ids, shape, kv_axis)


def softmax_init(ops: Ops, rows: int, head_dim: int):
  """(acc [rows, d], running max [rows], row sum [rows]) of an online softmax."""
  return (ops.full((rows, head_dim), 0.0), ops.full((rows,), masks.M_INIT),
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
  lse = jnp.where(empty, masks.EMPTY_ROW_LSE, m + jnp.log(safe_l) * (1.0 / math.log(2.0)))
  return acc / bcast(safe_l, acc.shape, 0), lse


def _fwd_kernel(*refs, tiling: Tiling, slots: int, ops: Ops):
  seg = tiling.has_segments
  n_in = 5 + (6 if seg else 0)
  ins, (o_ref, lse_ref), scratch = refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]
  if seg:
    q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, kv_lo, kv_hi, *stat_refs = ins
    (q_smem, k_ring, v_ring, lse_smem, q_ids_smem, kv_ids_ring, q_bar, k_ready, v_ready,
     k_consumed, v_consumed, q_ids_bar, kv_ids_ready) = scratch
  else:
    q_ref, k_ref, v_ref, kv_lo, kv_hi = ins
    stat_refs = ()
    (q_smem, k_ring, v_ring, lse_smem, q_bar, k_ready, v_ready, k_consumed,
     v_consumed) = scratch
  bq, bkv = tiling.block_q, tiling.block_kv
  head_dim = q_ref.shape[-1]
  b, h = lax.axis_index("batch"), lax.axis_index("heads")
  cta, wg = lax.axis_index("q_tiles"), lax.axis_index("wg")
  lo, hi = kv_lo[b, cta], kv_hi[b, cta]
  num_steps = hi - lo

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    ops.set_registers(compute=True)
    q_block = cta * COMPUTE_WGS + wg
    row0 = q_block * bq
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], q_smem.at[wg], q_bar.at[wg])
    q_ids = None
    if seg:
      plgpu.copy_gmem_to_smem(q_seg_ref.at[b, pl.ds(row0, bq)], q_ids_smem.at[wg],
                              q_ids_bar.at[wg])
      plgpu.barrier_wait(q_ids_bar.at[wg])
      q_ids = ops.load_vector(q_ids_smem.at[wg], axis=1)
    plgpu.barrier_wait(q_bar.at[wg])

    def step(t, carry):
      acc, m, l = carry
      kv_block, slot = lo + t, slot_of(t, slots)
      plgpu.barrier_wait(k_ready.at[slot])
      s = ops.matmul_nt(q_smem.at[wg], k_ring.at[slot], (bq, bkv)) * (tiling.scale * LOG2E)
      if tiling.needs_mask:
        kv_ids = None
        if seg:
          plgpu.barrier_wait(kv_ids_ready.at[slot])
          kv_ids = ops.load_vector(kv_ids_ring.at[slot], axis=0)
        masked = functools.partial(mask_scores, tiling=tiling, ops=ops, q_pos0=row0,
                                   kv_pos0=kv_block * bkv, q_ids=q_ids, kv_ids=kv_ids,
                                   transposed=False)
        full = tile_is_full(tiling, q_block, kv_block, stat_refs, b)
        s = lax.cond(full, lambda x: x, masked, s)
      plgpu.barrier_arrive(k_consumed.at[slot])
      p, acc, m_next, l = softmax_update(s, acc, m, l)
      plgpu.barrier_wait(v_ready.at[slot])
      acc = ops.matmul_acc(acc, p.astype(v_ring.dtype), v_ring.at[slot])
      plgpu.barrier_arrive(v_consumed.at[slot])
      return acc, m_next, l

    acc, m, l = lax.fori_loop(0, num_steps, step, softmax_init(ops, bq, head_dim))
    out, lse = softmax_result(acc, m, l)
    q_smem.at[wg][...] = out.astype(q_smem.dtype)
    lse_smem.at[wg][...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem.at[wg], o_ref.at[b, pl.ds(row0, bq), h])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _memory():
    ops.set_registers(compute=False)
    kv_head = lax.div(h, jnp.int32(tiling.group))
    rows = lambda t: pl.ds((lo + t) * bkv, bkv)
    streams = [Stream(lambda t: k_ref.at[b, rows(t), kv_head], k_ring, k_ready, k_consumed)]
    if seg:
      streams.append(Stream(lambda t: kv_seg_ref.at[b, rows(t)], kv_ids_ring, kv_ids_ready))
    streams.append(Stream(lambda t: v_ref.at[b, rows(t), kv_head], v_ring, v_ready,
                          v_consumed))
    produce_ring(streams, num_steps, slots)


def forward(q, k, v, q_seg, kv_seg, *, tiling: Tiling, slots: int, interpret):
  """Forward pass.

  Args:
    q: [b, tq, h, d]; k, v: [b, tk, k, d] (padded; d % 64 == 0; bf16 or f16).
    q_seg, kv_seg: int32 [b, tq], [b, tk] (padded) or None.
    interpret: False, or the GPU interpreter's params.

  Returns:
    out [b, tq, h, d] in q.dtype; lse [b, h, tq] float32 (log2 units).
  """
  batch, q_len, num_heads, head_dim = q.shape
  bq, bkv = tiling.block_q, tiling.block_kv
  rows_per_cta = COMPUTE_WGS * bq
  (kv_lo, kv_hi), _, stats = gpu_ranges(tiling, batch, q_seg, kv_seg, q_rows=rows_per_cta,
                                        kv_rows=bkv)
  slots = max(1, min(slots, tiling.num_kv_blocks))
  ops = Ops(interpret=bool(interpret))
  dtype = q.dtype
  scratch = [plgpu.SMEM((COMPUTE_WGS, bq, head_dim), dtype, transforms=TRANSFORMS),
             plgpu.SMEM((slots, bkv, head_dim), dtype, transforms=TRANSFORMS),
             plgpu.SMEM((slots, bkv, head_dim), dtype, transforms=TRANSFORMS),
             plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32)]
  if tiling.has_segments:
    scratch += [plgpu.SMEM((COMPUTE_WGS, bq), jnp.int32), plgpu.SMEM((slots, bkv), jnp.int32)]
  scratch += [plgpu.Barrier(num_barriers=COMPUTE_WGS),
              plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
              plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
              plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots)]
  operands = [q, k, v]
  if tiling.has_segments:
    scratch += [plgpu.Barrier(num_barriers=COMPUTE_WGS), plgpu.Barrier(num_barriers=slots)]
    operands += [q_seg, kv_seg, kv_lo, kv_hi, *stats]
  else:
    operands += [kv_lo, kv_hi]
  kernel = plgpu.kernel(
      functools.partial(_fwd_kernel, tiling=tiling, slots=slots, ops=ops),
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)],
      scratch_types=scratch,
      grid=(num_heads, q_len // rows_per_cta, batch),
      grid_names=("heads", "q_tiles", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret or None,
  )
  out, lse = kernel(*operands)
  return out, lse
