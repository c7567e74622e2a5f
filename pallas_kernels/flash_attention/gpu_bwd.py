"""Mosaic GPU (Hopper) flash attention backward: a dq kernel and a dk/dv kernel.

Legend: layers/__init__.py. The CTAs are common/gpu_cta_bwd.py's (compute
warpgroups owning rows, a memory warpgroup streaming the other operand through
a TMA ring), with tile sources from block ranges: dq takes the forward's
`RangeTiles` (gpu.py); dk/dv takes `RangeQTiles` (here), the (query head,
query block) tiles of a kv block's CTA, masked by position (transposed).

dq: CTA = compute_wgs * block_q_dq query rows of one q head; streams k, v.
dk/dv: CTA = compute_wgs * block_kv_dkv key rows of one kv head; streams q, do,
lse, delta of every query head in the GQA group, so dk and dv come out summed
over the group.
"""

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels.common.gpu import Ops, warp_specialized_kernel
from pallas_kernels.common.gpu_cta_bwd import (DkvScratch, DqScratch, dkv_cta,
                                               dkv_scratch_types, dq_cta, dq_scratch_types)
from pallas_kernels.common.masking import Tiling
from pallas_kernels.flash_attention.gpu import RangeTiles, gpu_ranges, mask_unless_full


def _dq_kernel(*refs, tiling: Tiling, slots: int, wgs: int, ops: Ops):
  seg = tiling.has_segments
  n_in = 8 + (6 if seg else 0)
  ins, dq_ref, scratch = refs[:n_in], refs[n_in], refs[n_in + 1:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kv_lo, kv_hi = ins[:8]
  q_seg_ref, kv_seg_ref, *stat_refs = ins[8:] if seg else (None, None)
  tiles_of = lambda b, h, cta: RangeTiles.of_cta(tiling, ops, kv_lo, kv_hi, stat_refs, b, cta)
  sc = DqScratch(*scratch)
  dq_cta(tiles_of, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                    dq_ref), sc, scale=tiling.scale, group=tiling.group, slots=slots, wgs=wgs,
         ops=ops)


@dataclasses.dataclass(frozen=True)
class RangeQTiles:
  """The (query head, query block) tiles of a flash dk/dv CTA, transposed masks.

  Steps walk the q blocks [lo, hi) of each of the kv head's `group` query
  heads. Tile-source protocol of dkv_cta: num_steps, q_block(t), q_head(t),
  needs_mask, mask(...) and extra_streams(...).
  """
  tiling: Tiling
  ops: Ops
  lo: object
  span: object
  num_steps: object
  kv_head: object
  stat_refs: tuple
  batch: object

  @classmethod
  def of_cta(cls, tiling: Tiling, ops: Ops, q_lo, q_hi, stat_refs, batch, kv_head, cta):
    lo, hi = q_lo[batch, cta], q_hi[batch, cta]
    span = jnp.maximum(hi - lo, 1)
    num_steps = (hi - lo) * tiling.group  # (q head in group, q block) pairs.
    return cls(tiling, ops, lo, span, num_steps, kv_head, tuple(stat_refs), batch)

  @property
  def needs_mask(self) -> bool:
    return self.tiling.needs_mask

  def q_block(self, t):
    return self.lo + lax.rem(t, self.span)

  def q_head(self, t):
    return self.kv_head * self.tiling.group + lax.div(t, self.span)

  def mask(self, s_t, *, t, slot, wg, kv_block, kv_pos0, q_block, q_ids, kv_ids):
    """s_t [kv, q] with -inf where not visible; wholly visible tiles skip the work."""
    del t, slot, wg
    return mask_unless_full(s_t, tiling=self.tiling, ops=self.ops, stat_refs=self.stat_refs,
                            batch=self.batch, q_block=q_block, kv_block=kv_block,
                            q_pos0=q_block * self.tiling.block_q, kv_pos0=kv_pos0,
                            q_ids=q_ids, kv_ids=kv_ids, transposed=True)

  def extra_streams(self, wgs: int):
    del wgs
    return []


def _dkv_kernel(*refs, tiling: Tiling, slots: int, wgs: int, ops: Ops):
  seg = tiling.has_segments
  n_in = 8 + (6 if seg else 0)
  ins, (dk_ref, dv_ref), scratch = refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_lo, q_hi = ins[:8]
  q_seg_ref, kv_seg_ref, *stat_refs = ins[8:] if seg else (None, None)
  tiles_of = lambda b, kv_head, cta: RangeQTiles.of_cta(tiling, ops, q_lo, q_hi, stat_refs, b,
                                                        kv_head, cta)
  dkv_cta(tiles_of, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                     dk_ref, dv_ref), DkvScratch(*scratch), scale=tiling.scale, slots=slots,
          wgs=wgs, ops=ops)


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, *, tiling: Tiling, slots: int,
                wgs: int, interpret):
  """dq [b, t, h, d] from q, do [b, t, h, d], k, v [b, s, k, d], lse, delta [b, h, t]."""
  batch, q_len, num_heads, head_dim = q.shape
  bq, bkv, dtype = tiling.block_q, tiling.block_kv, q.dtype
  (kv_lo, kv_hi), _, stats = gpu_ranges(tiling, batch, q_seg, kv_seg, q_rows=wgs * bq,
                                        kv_rows=bkv)
  slots = max(1, min(slots, tiling.num_kv_blocks))
  seg = tiling.has_segments
  base, ids = dq_scratch_types(wgs=wgs, bq=bq, bkv=bkv, head_dim=head_dim, slots=slots,
                               dtype=dtype, seg=seg)
  operands = [q, k, v, do, lse, delta, kv_lo, kv_hi]
  if seg:
    operands += [q_seg, kv_seg, *stats]
  return warp_specialized_kernel(
      functools.partial(_dq_kernel, tiling=tiling, slots=slots, wgs=wgs,
                        ops=Ops(interpret=bool(interpret))),
      out_type=jax.ShapeDtypeStruct(q.shape, dtype), scratch=base + ids,
      grid=(num_heads, q_len // (wgs * bq), batch), grid_names=("heads", "q_tiles", "batch"),
      compute_wgs=wgs, interpret=interpret)(*operands)


def backward_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, *, tiling: Tiling, slots: int,
                 wgs: int, interpret):
  """(dk, dv) [b, s, k, d], summed over each kv head's query heads."""
  batch, kv_len, num_kv_heads, head_dim = k.shape
  bq, bkv, dtype = tiling.block_q, tiling.block_kv, k.dtype
  _, (q_lo, q_hi), stats = gpu_ranges(tiling, batch, q_seg, kv_seg, q_rows=bq,
                                      kv_rows=wgs * bkv)
  seg = tiling.has_segments
  base, ids = dkv_scratch_types(wgs=wgs, bq=bq, bkv=bkv, head_dim=head_dim, slots=slots,
                                dtype=dtype, seg=seg)
  operands = [q, k, v, do, lse, delta, q_lo, q_hi]
  if seg:
    operands += [q_seg, kv_seg, *stats]
  dk, dv = warp_specialized_kernel(
      functools.partial(_dkv_kernel, tiling=tiling, slots=slots, wgs=wgs,
                        ops=Ops(interpret=bool(interpret))),
      out_type=[jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)],
      scratch=base + ids, grid=(num_kv_heads, kv_len // (wgs * bkv), batch),
      grid_names=("heads", "kv_tiles", "batch"), compute_wgs=wgs, interpret=interpret,
  )(*operands)
  return dk, dv
