"""Mosaic GPU (Hopper) block-sparse attention forward, and helpers for the backward.

Legend: layers/__init__.py. common/gpu_cta.py's forward CTA (forward_cta: TMA
ring, wgmma, warp specialization, online softmax) run with MapTiles as its tile
source: the kv blocks of each CTA come from a KernelMap (block_map.py) instead
of a [lo, hi) range: the memory warpgroup streams exactly the listed blocks, so
absent tiles cost nothing. A map entry is FULL (no mask work) or PARTIAL: then
the memory warpgroup also streams the tile's element mask (deduplicated in
GMEM, bit-packed to 1 bit per element, copied only for PARTIAL entries) into a
ring slot released with the k slot.
Segment ids are masked as in flash attention (tiles with one shared segment
skip that mask).

Layout: q [b, t, h, d], k/v [b, s, k, d] (t and s padded, d % 64 == 0,
bf16/f16). The map's tiles are CTA tiles: 2 * block_q query rows x block_kv
keys.
"""

import dataclasses
import functools

import jax
from jax import lax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse.block_map import KernelMap
from pallas_kernels.common import masking
from pallas_kernels.common.gpu import (Ops, Stream, bcast, segment_mask, smem,
                                       warp_specialized_kernel)
from pallas_kernels.common.gpu_cta import COMPUTE_WGS, FwdScratch, forward_cta


def has_partial(kmap: KernelMap) -> bool:
  return bool(np.any(kmap.mask_id >= 0))


def pack_bits(tiles, wgs: int):
  """int8 [T, rows, cols] 0/1 -> int32 [T, wgs, cols / 32, rows / wgs] bit planes.

  Bit c % 32 of word [.., c // 32, r] is the mask at (r, c) of the warpgroup's
  rows: 1 bit per element, so a ring slot of a 128 x 128 tile is 2 KiB.
  """
  n, rows, cols = tiles.shape
  bits = tiles.reshape(n, wgs, rows // wgs, cols // 32, 32).astype(np.uint64)
  words = (bits << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)
  return np.ascontiguousarray(words.view(np.int32).transpose(0, 1, 3, 2))


def unpack_bits(ops: Ops, words_ref, shape):
  """bool tile [rows, cols] (wgmma layout) from a [cols / 32, rows] int32 SMEM ref."""
  col = ops.iota(shape, 1)
  word_of_col, bit = lax.shift_right_logical(col, 5), col & 31
  word = None
  for w in range(shape[1] // 32):
    vec = bcast(ops.load_vector(words_ref.at[w], axis=1), shape, 0)
    word = vec if word is None else jnp.where(word_of_col == w, vec, word)
  return (lax.shift_right_logical(word, bit) & 1) != 0


def map_operands(kmap: KernelMap, wgs: int):
  """(index, mask_id, counts, packed masks [T, wgs, cols / 32, rows / wgs]) as arrays."""
  return (jnp.asarray(kmap.index), jnp.asarray(kmap.mask_id), jnp.asarray(kmap.counts),
          jnp.asarray(pack_bits(kmap.partial_masks, wgs)))


def mask_scratch(partial: bool, slots: int, wgs: int, rows: int, cols: int):
  """[SMEM ring of packed masks, its ready barriers] (a stub without PARTIAL tiles)."""
  shape = (slots, wgs, cols // 32, rows) if partial else (1, 1, 1, 8)
  return [plgpu.SMEM(shape, jnp.int32), plgpu.Barrier(num_barriers=slots if partial else 1)]


def seg_stats(q_seg, kv_seg, block_q: int, block_kv: int):
  """Per-warpgroup-tile (q_min, q_max) [b, t / block_q], (kv_min, kv_max) [b, s / block_kv]."""
  return (*masking.segment_block_stats(q_seg, block_q),
          *masking.segment_block_stats(kv_seg, block_kv))


def tile_full(partial, stat_refs, batch, q_block, kv_block):
  """Traced bool: the tile needs no mask (not PARTIAL, and one shared segment)."""
  full = jnp.logical_not(partial)
  if stat_refs:
    q_min, q_max, kv_min, kv_max = stat_refs
    full = full & masking.segments_uniform(q_min[batch, q_block], q_max[batch, q_block],
                                           kv_min[batch, kv_block], kv_max[batch, kv_block])
  return full


def apply_mask(s, *, full, partial, load_tile, seg_ids, transposed: bool, needs_tile: bool):
  """-inf where not visible: the PARTIAL element mask (load_tile() waits for it
  and returns it as a bool tile; called only for PARTIAL entries) and segment equality (seg_ids =
  (q_ids, kv_ids) vectors or None). s is [q, kv] ([kv, q] when transposed)."""
  def masked(s):
    if needs_tile:
      with_tile = lambda s: jnp.where(load_tile(), s, -jnp.inf)
      s = lax.cond(partial, with_tile, lambda x: x, s)
    if seg_ids is not None:
      s = jnp.where(segment_mask(*seg_ids, s.shape, transposed), s, -jnp.inf)
    return s
  return lax.cond(full, lambda x: x, masked, s)


def mask_stream(masks_ref, mask_ring, mask_ready, mask_id_of):
  """The memory warpgroup's stream of PARTIAL entries' element masks."""
  return Stream(lambda t: masks_ref.at[jnp.maximum(mask_id_of(t), 0)], mask_ring,
                mask_ready, when=lambda t: mask_id_of(t) >= 0)


@dataclasses.dataclass(frozen=True)
class MapEntries:
  """One KernelMap row as a CTA's tile source (the shared part of MapTiles, MapQTiles).

  FULL entries skip the mask; PARTIAL ones wait for their element mask, which
  the memory warpgroup streams (extra_streams) into `mask_ring`.
  """
  ops: Ops
  index: object
  mask_id: object
  head: object  # The map's head (kernel head // kmap.head_div).
  cta: object
  num_steps: object
  stat_refs: tuple
  batch: object
  seg: bool
  partial: bool
  masks_ref: object
  mask_ring: object
  mask_ready: object

  @staticmethod
  def common_fields(kmap: KernelMap, ops: Ops, map_refs, mask_scratch_refs, stat_refs, *,
                    seg, partial, batch, head, cta):
    """The base fields, in order, for row `cta` of kernel head `head`."""
    index, mask_id, counts, masks_ref = map_refs
    hm = lax.div(head, jnp.int32(kmap.head_div))
    return (ops, index, mask_id, hm, cta, counts[hm, cta], tuple(stat_refs), batch, seg,
            partial, masks_ref, *mask_scratch_refs)

  @property
  def needs_mask(self) -> bool:
    return self.seg or self.partial

  def entry(self, t):
    return self.index[self.head, self.cta, t]

  def mask_id_of(self, t):
    return self.mask_id[self.head, self.cta, t]

  def masked(self, s, *, t, slot, wg, q_block, kv_block, q_ids, kv_ids, transposed: bool):
    """s [q, kv] ([kv, q] when transposed) with -inf where not visible."""
    seg_ids = (q_ids, kv_ids) if self.seg else None
    is_partial = self.mask_id_of(t) >= 0

    def load_tile():
      plgpu.barrier_wait(self.mask_ready.at[slot])
      return unpack_bits(self.ops, self.mask_ring.at[slot, wg], s.shape)
    return apply_mask(s, full=tile_full(is_partial, self.stat_refs, self.batch, q_block,
                                        kv_block),
                      partial=is_partial, load_tile=load_tile, seg_ids=seg_ids,
                      transposed=transposed, needs_tile=self.partial)

  def extra_streams(self, wgs: int):
    del wgs
    if not self.partial:
      return []
    return [mask_stream(self.masks_ref, self.mask_ring, self.mask_ready, self.mask_id_of)]


@dataclasses.dataclass(frozen=True)
class MapTiles(MapEntries):
  """The kv tiles of a block-sparse forward or dq CTA: entries name kv blocks.

  The tile-source protocol of common/gpu_cta.forward_cta / gpu_cta_bwd.dq_cta.
  """

  @classmethod
  def of_cta(cls, kmap: KernelMap, ops: Ops, map_refs, mask_scratch_refs, stat_refs, **kw):
    return cls(*cls.common_fields(kmap, ops, map_refs, mask_scratch_refs, stat_refs, **kw))

  def kv_block(self, t):
    return self.entry(t)

  def mask(self, s, *, t, slot, wg, q_block, q_pos0, kv_block, q_ids, kv_ids):
    del q_pos0
    return self.masked(s, t=t, slot=slot, wg=wg, q_block=q_block, kv_block=kv_block,
                       q_ids=q_ids, kv_ids=kv_ids, transposed=False)


def _fwd_kernel(*refs, kmap: KernelMap, group: int, scale: float, slots: int, ops: Ops,
                seg: bool, partial: bool):
  q_ref, k_ref, v_ref, *map_refs = refs[:7]
  n_in = 7 + (6 if seg else 0)
  q_seg_ref, kv_seg_ref, *stat_refs = refs[7:n_in] if seg else (None, None)
  (o_ref, lse_ref), scratch = refs[n_in:n_in + 2], list(refs[n_in + 2:])
  (q_smem, k_ring, v_ring, lse_smem, mask_ring, q_bar, k_ready, v_ready, k_consumed,
   v_consumed, mask_ready) = scratch[:11]
  ids = {}
  if seg:
    ids = dict(zip(("q_ids_smem", "kv_ids_ring", "q_ids_bar", "kv_ids_ready"), scratch[11:]))
  tiles_of = lambda b, h, cta: MapTiles.of_cta(
      kmap, ops, map_refs, (mask_ring, mask_ready), stat_refs, seg=seg, partial=partial,
      batch=b, head=h, cta=cta)
  sc = FwdScratch(q_smem, k_ring, v_ring, lse_smem, q_bar, k_ready, v_ready, k_consumed,
                  v_consumed, **ids)
  forward_cta(tiles_of, (q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref), sc,
              scale=scale, group=group, slots=slots, ops=ops)


def forward(q, k, v, q_seg, kv_seg, *, kmap: KernelMap, scale: float, slots: int,
            interpret):
  """(out [b, t, h, d], lse [b, h, t] f32 log2 units) over the tiles of kmap."""
  batch, q_len, num_heads, head_dim = q.shape
  rows, bkv = kmap.block_rows, kmap.block_cols
  bq = rows // COMPUTE_WGS
  slots = max(1, min(slots, kmap.max_steps))
  seg, partial = q_seg is not None, has_partial(kmap)
  dtype = q.dtype
  mask_ring, mask_ready = mask_scratch(partial, slots, COMPUTE_WGS, bq, bkv)
  scratch = [smem((COMPUTE_WGS, bq, head_dim), dtype, True),
             smem((slots, bkv, head_dim), dtype, True), smem((slots, bkv, head_dim), dtype, True),
             smem((COMPUTE_WGS, bq), jnp.float32),
             mask_ring, plgpu.Barrier(num_barriers=COMPUTE_WGS),
             plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
             plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
             plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots), mask_ready]
  operands = [q, k, v, *map_operands(kmap, COMPUTE_WGS)]
  if seg:
    scratch += [smem((COMPUTE_WGS, bq), jnp.int32), smem((slots, bkv), jnp.int32),
                plgpu.Barrier(num_barriers=COMPUTE_WGS), plgpu.Barrier(num_barriers=slots)]
    operands += [q_seg, kv_seg, *seg_stats(q_seg, kv_seg, bq, bkv)]
  return warp_specialized_kernel(
      functools.partial(_fwd_kernel, kmap=kmap, group=num_heads // k.shape[2], scale=scale,
                        slots=slots, ops=Ops(interpret=bool(interpret)), seg=seg,
                        partial=partial),
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)],
      scratch=scratch, grid=(num_heads, q_len // rows, batch),
      grid_names=("heads", "q_tiles", "batch"), compute_wgs=COMPUTE_WGS,
      interpret=interpret)(*operands)
