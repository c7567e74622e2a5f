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

`forward_cta` is one CTA over a tile source, which says which kv blocks the
CTA visits and how a tile is masked: `RangeTiles` ([lo, hi) and positions)
here, block_sparse_gpu.MapTiles (a block map's entries) for block-sparse
attention. The backward CTAs (flash_attention_gpu_bwd) take the same sources.
"""

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import flash_attention_masks as masks
from pallas_kernels.flash_attention_gpu_ops import (Ops, Stream, bcast, produce_ring, slot_of,
                                                    smem, warp_specialized_kernel)
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


def mask_unless_full(s, *, tiling: Tiling, ops: Ops, stat_refs, batch, q_block, kv_block,
                     q_pos0, kv_pos0, q_ids, kv_ids, transposed: bool):
  """mask_scores(s), skipped (lax.cond) for tiles that tile_is_full says need no mask."""
  masked = functools.partial(mask_scores, tiling=tiling, ops=ops, q_pos0=q_pos0,
                             kv_pos0=kv_pos0, q_ids=q_ids, kv_ids=kv_ids, transposed=transposed)
  full = tile_is_full(tiling, q_block, kv_block, stat_refs, batch)
  return lax.cond(full, lambda x: x, masked, s)


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


@dataclasses.dataclass(frozen=True)
class RangeTiles:
  """The kv tiles of a flash-attention CTA: blocks [lo, hi), masked by position.

  The tile source protocol (block_sparse_gpu.MapTiles is the other one):
  num_steps, kv_block(t), needs_mask, mask(...) and extra_streams(...).
  """
  tiling: Tiling
  ops: Ops
  lo: object
  num_steps: object
  stat_refs: tuple
  batch: object

  @classmethod
  def of_cta(cls, tiling: Tiling, ops: Ops, kv_lo, kv_hi, stat_refs, batch, cta):
    """The tiles of CTA `cta` from the per-CTA [lo, hi) block ranges."""
    lo, hi = kv_lo[batch, cta], kv_hi[batch, cta]
    return cls(tiling, ops, lo, hi - lo, tuple(stat_refs), batch)

  @property
  def needs_mask(self) -> bool:
    return self.tiling.needs_mask

  def kv_block(self, t):
    return self.lo + t

  def mask(self, s, *, t, slot, wg, q_block, q_pos0, kv_block, q_ids, kv_ids):
    """s [q, kv] with -inf where not visible; tiles wholly visible skip the work."""
    del t, slot, wg
    return mask_unless_full(s, tiling=self.tiling, ops=self.ops, stat_refs=self.stat_refs,
                            batch=self.batch, q_block=q_block, kv_block=kv_block,
                            q_pos0=q_pos0, kv_pos0=kv_block * self.tiling.block_kv,
                            q_ids=q_ids, kv_ids=kv_ids, transposed=False)

  def extra_streams(self, wgs: int):
    del wgs
    return []


def forward_cta(tiles_of, refs, scratch: FwdScratch, *, scale: float, group: int, slots: int,
                ops: Ops):
  """One forward CTA: COMPUTE_WGS compute warpgroups and a memory warpgroup.

  tiles_of(batch, head, cta) -> the CTA's kv tiles (RangeTiles, or
  block_sparse_gpu.MapTiles).
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


def _fwd_kernel(*refs, tiling: Tiling, slots: int, ops: Ops):
  seg = tiling.has_segments
  n_in = 5 + (6 if seg else 0)
  ins, (o_ref, lse_ref), scratch = refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]
  if seg:
    q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, kv_lo, kv_hi, *stat_refs = ins
    (q_smem, k_ring, v_ring, lse_smem, q_ids_smem, kv_ids_ring, q_bar, k_ready, v_ready,
     k_consumed, v_consumed, q_ids_bar, kv_ids_ready) = scratch
    ids = dict(q_ids_smem=q_ids_smem, kv_ids_ring=kv_ids_ring, q_ids_bar=q_ids_bar,
               kv_ids_ready=kv_ids_ready)
  else:
    q_ref, k_ref, v_ref, kv_lo, kv_hi = ins
    q_seg_ref = kv_seg_ref = None
    stat_refs, ids = (), {}
    (q_smem, k_ring, v_ring, lse_smem, q_bar, k_ready, v_ready, k_consumed,
     v_consumed) = scratch
  tiles_of = lambda b, h, cta: RangeTiles.of_cta(tiling, ops, kv_lo, kv_hi, stat_refs, b, cta)
  sc = FwdScratch(q_smem, k_ring, v_ring, lse_smem, q_bar, k_ready, v_ready, k_consumed,
                  v_consumed, **ids)
  forward_cta(tiles_of, (q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref), sc,
              scale=tiling.scale, group=tiling.group, slots=slots, ops=ops)


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
  scratch = [smem((COMPUTE_WGS, bq, head_dim), dtype, True),
             smem((slots, bkv, head_dim), dtype, True), smem((slots, bkv, head_dim), dtype, True),
             smem((COMPUTE_WGS, bq), jnp.float32)]
  if tiling.has_segments:
    scratch += [smem((COMPUTE_WGS, bq), jnp.int32), smem((slots, bkv), jnp.int32)]
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
  return warp_specialized_kernel(
      functools.partial(_fwd_kernel, tiling=tiling, slots=slots, ops=ops),
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)],
      scratch=scratch, grid=(num_heads, q_len // rows_per_cta, batch),
      grid_names=("heads", "q_tiles", "batch"), compute_wgs=COMPUTE_WGS,
      interpret=interpret)(*operands)
