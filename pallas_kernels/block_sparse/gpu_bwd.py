"""Mosaic GPU (Hopper) block-sparse attention backward: dq and dk/dv kernels.

Legend: layers/__init__.py. common/gpu_cta_bwd.py's CTAs (dq_cta, dkv_cta:
compute warpgroups owning rows, a memory warpgroup streaming the other operand
through a TMA ring) with tile sources read from KernelMaps (gpu.MapTiles,
MapQTiles here): dq streams the k/v blocks its query CTA lists; dk/dv streams,
per key CTA, the (query head in group, query block) entries of the transposed
map, so dk and dv come out summed over the GQA group. PARTIAL entries also
stream their element mask (gpu.mask_stream); FULL entries do no mask work.
"""

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels.block_sparse import gpu as sgpu
from pallas_kernels.block_sparse.block_map import KernelMap
from pallas_kernels.common.gpu import Ops, warp_specialized_kernel
from pallas_kernels.common.gpu_cta_bwd import (DkvScratch, DqScratch, dkv_cta,
                                               dkv_scratch_types, dq_cta, dq_scratch_types)


def _dq_kernel(*refs, kmap: KernelMap, group: int, scale: float, slots: int, wgs: int,
               ops: Ops, seg: bool, partial: bool):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *map_refs = refs[:10]
  n_in = 10 + (6 if seg else 0)
  q_seg_ref, kv_seg_ref, *stat_refs = refs[10:n_in] if seg else (None, None)
  dq_ref, scratch = refs[n_in], refs[n_in + 1:]
  (q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring, q_bars, k_ready, v_ready,
   k_consumed, v_consumed, mask_ring, mask_ready, *seg_scratch) = scratch
  tiles_of = lambda b, h, cta: sgpu.MapTiles.of_cta(
      kmap, ops, map_refs, (mask_ring, mask_ready), stat_refs, seg=seg, partial=partial,
      batch=b, head=h, cta=cta)
  sc = DqScratch(q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring, q_bars, k_ready,
                 v_ready, k_consumed, v_consumed, *seg_scratch)
  dq_cta(tiles_of, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                    kv_seg_ref, dq_ref), sc, scale=scale, group=group, slots=slots,
         wgs=wgs, ops=ops)


@dataclasses.dataclass(frozen=True)
class MapQTiles(sgpu.MapEntries):
  """The (query head, query block) tiles of a block-sparse dk/dv CTA: its map row.

  Entry e names query head kv_head * group + e // num_q_blocks and query block
  e % num_q_blocks. Tile-source protocol of common/gpu_cta_bwd.dkv_cta.
  """
  kv_head: object = None
  group: int = 1
  num_q_blocks: int = 1

  @classmethod
  def of_cta(cls, kmap: KernelMap, ops: Ops, map_refs, mask_scratch_refs, stat_refs, *, seg,
             partial, group, num_q_blocks, batch, kv_head, cta):
    common = cls.common_fields(kmap, ops, map_refs, mask_scratch_refs, stat_refs, seg=seg,
                               partial=partial, batch=batch, head=kv_head, cta=cta)
    return cls(*common, kv_head=kv_head, group=group, num_q_blocks=num_q_blocks)

  def q_block(self, t):
    return lax.rem(self.entry(t), jnp.int32(self.num_q_blocks))

  def q_head(self, t):
    return self.kv_head * self.group + lax.div(self.entry(t), jnp.int32(self.num_q_blocks))

  def mask(self, s_t, *, t, slot, wg, kv_block, kv_pos0, q_block, q_ids, kv_ids):
    del kv_pos0
    return self.masked(s_t, t=t, slot=slot, wg=wg, q_block=q_block, kv_block=kv_block,
                       q_ids=q_ids, kv_ids=kv_ids, transposed=True)


def _dkv_kernel(*refs, kmap: KernelMap, group: int, num_q_blocks: int, scale: float,
                slots: int, wgs: int, ops: Ops, seg: bool, partial: bool):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *map_refs = refs[:10]
  n_in = 10 + (6 if seg else 0)
  q_seg_ref, kv_seg_ref, *stat_refs = refs[10:n_in] if seg else (None, None)
  (dk_ref, dv_ref), scratch = refs[n_in:n_in + 2], refs[n_in + 2:]
  (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bars, q_ready, do_ready,
   lse_ready, delta_ready, q_consumed, do_consumed, mask_ring, mask_ready,
   *seg_scratch) = scratch
  tiles_of = lambda b, kv_head, cta: MapQTiles.of_cta(
      kmap, ops, map_refs, (mask_ring, mask_ready), stat_refs, seg=seg, partial=partial,
      group=group, num_q_blocks=num_q_blocks, batch=b, kv_head=kv_head, cta=cta)
  sc = DkvScratch(k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bars, q_ready,
                  do_ready, lse_ready, delta_ready, q_consumed, do_consumed, *seg_scratch)
  dkv_cta(tiles_of, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                     kv_seg_ref, dk_ref, dv_ref), sc, scale=scale, slots=slots, wgs=wgs,
          ops=ops)


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, *, kmap: KernelMap, scale: float,
                slots: int, wgs: int, interpret):
  """dq [b, t, h, d] over the dq map's tiles (CTA: wgs * block_q query rows)."""
  batch, q_len, num_heads, head_dim = q.shape
  rows, bkv, dtype = kmap.block_rows, kmap.block_cols, q.dtype
  bq = rows // wgs
  slots = max(1, min(slots, kmap.max_steps))
  seg, partial = q_seg is not None, sgpu.has_partial(kmap)
  base, ids = dq_scratch_types(wgs=wgs, bq=bq, bkv=bkv, head_dim=head_dim, slots=slots,
                               dtype=dtype, seg=seg)
  scratch = base + sgpu.mask_scratch(partial, slots, wgs, bq, bkv) + ids
  operands = [q, k, v, do, lse, delta, *sgpu.map_operands(kmap, wgs)]
  if seg:
    operands += [q_seg, kv_seg, *sgpu.seg_stats(q_seg, kv_seg, bq, bkv)]
  body = functools.partial(_dq_kernel, kmap=kmap, group=num_heads // k.shape[2], scale=scale,
                           slots=slots, wgs=wgs, ops=Ops(interpret=bool(interpret)), seg=seg,
                           partial=partial)
  return warp_specialized_kernel(
      body, out_type=jax.ShapeDtypeStruct(q.shape, dtype), scratch=scratch,
      grid=(num_heads, q_len // rows, batch), grid_names=("heads", "q_tiles", "batch"),
      compute_wgs=wgs, interpret=interpret)(*operands)


def backward_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, *, kmap: KernelMap, scale: float,
                 slots: int, wgs: int, interpret):
  """(dk, dv) [b, s, k, d] over the dkv map's tiles (CTA: wgs * block_kv key rows)."""
  batch, kv_len, num_kv_heads, head_dim = k.shape
  rows, bq, dtype = kmap.block_rows, kmap.block_cols, k.dtype
  bkv = rows // wgs
  slots = max(1, min(slots, kmap.max_steps))
  seg, partial = q_seg is not None, sgpu.has_partial(kmap)
  base, ids = dkv_scratch_types(wgs=wgs, bq=bq, bkv=bkv, head_dim=head_dim, slots=slots,
                                dtype=dtype, seg=seg)
  scratch = base + sgpu.mask_scratch(partial, slots, wgs, bkv, bq) + ids
  operands = [q, k, v, do, lse, delta, *sgpu.map_operands(kmap, wgs)]
  if seg:
    operands += [q_seg, kv_seg, *sgpu.seg_stats(q_seg, kv_seg, bq, bkv)]
  body = functools.partial(_dkv_kernel, kmap=kmap, group=q.shape[2] // num_kv_heads,
                           num_q_blocks=q.shape[1] // bq, scale=scale, slots=slots, wgs=wgs,
                           ops=Ops(interpret=bool(interpret)), seg=seg, partial=partial)
  dk, dv = warp_specialized_kernel(
      body, out_type=[jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)],
      scratch=scratch, grid=(num_kv_heads, kv_len // rows, batch),
      grid_names=("heads", "kv_tiles", "batch"), compute_wgs=wgs, interpret=interpret,
  )(*operands)
  return dk, dv
