"""Mosaic GPU (Hopper) flash attention forward: TMA ring, wgmma, warp specialization.

Legend: layers/__init__.py. Layout is the public one, q [b, t, h, d] and k/v
[b, s, k, d] (t, s padded to whole blocks, d a multiple of 64); TMA reads a
(rows, d) slab of one head straight from it. A CTA owns 2 * block_q query rows
of one head: two compute warpgroups of block_q rows each, and a memory
warpgroup that streams the k/v blocks [kv_lo, kv_hi) of the CTA through a ring
of `max_concurrent_steps` SMEM slots. Tiles that are not wholly visible (causal
edge, window edge, padded keys, mixed segments) are masked; the rest skip the
mask.

The CTA is common/gpu_cta.py's forward_cta (online softmax, log2 units) with
`RangeTiles` as its tile source: the kv blocks [lo, hi) and masks by position.
The dq kernel (gpu_bwd) takes the same source.
"""

import dataclasses
import functools

import jax
from jax import lax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.common import masking
from pallas_kernels.common.gpu import Ops, segment_mask, smem, warp_specialized_kernel
from pallas_kernels.common.gpu_cta import COMPUTE_WGS, FwdScratch, forward_cta
from pallas_kernels.common.masking import Tiling


def gpu_ranges(tiling: Tiling, batch: int, q_seg, kv_seg, *, q_rows: int, kv_rows: int):
  """Visited block ranges per CTA and per-block segment statistics (XLA side).

  A CTA covers q_rows query rows (forward, dq) or kv_rows key rows (dk/dv).

  Returns:
    (lo, hi) int32 [b, t // q_rows]: kv blocks of kv_rows each q CTA visits;
    (lo, hi) int32 [b, s // kv_rows]: q blocks of q_rows each kv CTA visits;
    seg_stats: (q_min, q_max) [b, t // block_q] and (kv_min, kv_max)
    [b, s // block_kv] (tiling's blocks), or (). t and s are padded.
  """
  stats, cta_stats = (), None
  if tiling.has_segments:
    stats = (*masking.segment_block_stats(q_seg, tiling.block_q),
             *masking.segment_block_stats(kv_seg, tiling.block_kv))
    cta_stats = (*masking.segment_block_stats(q_seg, q_rows),
                 *masking.segment_block_stats(kv_seg, kv_rows))
  kv_range, q_range, _, _ = masking.block_ranges(
      batch, tiling.padded_q_len // q_rows, tiling.padded_kv_len // kv_rows,
      block_q=q_rows, block_kv=kv_rows, window=tiling.window, seg_stats=cta_stats)
  return kv_range, q_range, stats


def tile_is_full(tiling: Tiling, q_block, kv_block, seg_stat_refs, batch):
  """Traced bool: tile (q_block, kv_block) at tiling's block sizes needs no mask."""
  full = masking.tile_fully_visible(
      q_block, kv_block, block_q=tiling.block_q, block_kv=tiling.block_kv,
      window=tiling.window, kv_len=tiling.kv_len, padded_kv_len=tiling.padded_kv_len)
  if seg_stat_refs:
    q_min, q_max, kv_min, kv_max = seg_stat_refs
    full = full & masking.segments_uniform(q_min[batch, q_block], q_max[batch, q_block],
                                           kv_min[batch, kv_block], kv_max[batch, kv_block])
  return jnp.asarray(full, jnp.bool_)


def mask_scores(s, *, tiling: Tiling, ops: Ops, q_pos0, kv_pos0, q_ids, kv_ids,
                transposed: bool):
  """-inf where not visible. s is [q, kv] (or [kv, q] when transposed)."""
  shape = s.shape
  q_axis, kv_axis = (1, 0) if transposed else (0, 1)
  q_pos = q_pos0 + ops.iota(shape, q_axis)
  kv_pos = kv_pos0 + ops.iota(shape, kv_axis)
  mask = masking.visible(q_pos, kv_pos, window=tiling.window, kv_len=tiling.padded_kv)
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


@dataclasses.dataclass(frozen=True)
class RangeTiles:
  """The kv tiles of a flash-attention CTA: blocks [lo, hi), masked by position.

  The tile source protocol (block_sparse.gpu.MapTiles is the other one):
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
    q: [b, t, h, d]; k, v: [b, s, k, d] (t, s padded; d % 64 == 0; bf16 or f16).
    q_seg, kv_seg: int32 [b, t], [b, s] (padded) or None.
    interpret: False, or the GPU interpreter's params.

  Returns:
    out [b, t, h, d] in q.dtype; lse [b, h, t] float32 (log2 units).
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
