"""Mosaic GPU (Hopper) block-sparse attention forward, and helpers for the backward.

The flash_attention_gpu kernel (TMA ring, wgmma, warp specialization, online
softmax, all imported from there) with the kv blocks of each CTA read from a
KernelMap (block_sparse_map) instead of a [lo, hi) range: the memory warpgroup
streams exactly the listed blocks, so absent tiles cost nothing. A map entry
is FULL (no mask work) or PARTIAL: then the memory warpgroup also streams the
tile's element mask (deduplicated in GMEM, bit-packed to 1 bit per element,
copied only for PARTIAL entries) into a ring slot released with the k slot.
Segment ids are masked as in flash attention (tiles with one shared segment
skip that mask).

Layout: q [b, tq, h, d], k/v [b, tk, k, d] (padded, d % 64 == 0, bf16/f16).
The map's tiles are CTA tiles: 2 * block_q query rows x block_kv keys.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels import flash_attention_gpu as fgpu
from pallas_kernels import flash_attention_masks as masks
from pallas_kernels.block_sparse_map import KernelMap
from pallas_kernels.flash_attention_gpu_ops import (TRANSFORMS, Ops, Stream, bcast,
                                                    produce_ring, slot_of)

LOG2E = fgpu.LOG2E
COMPUTE_WGS = fgpu.COMPUTE_WGS


def has_partial(kmap: KernelMap) -> bool:
  return bool(np.any(kmap.mask_id >= 0))


def pack_bits(tiles, wgs: int):
  """int8 [n, rows, cols] 0/1 -> int32 [n, wgs, cols / 32, rows / wgs] bit planes.

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
  """(index, mask_id, counts, packed masks [n, wgs, cols / 32, rows / wgs]) as arrays."""
  return (jnp.asarray(kmap.index), jnp.asarray(kmap.mask_id), jnp.asarray(kmap.counts),
          jnp.asarray(pack_bits(kmap.partial_masks, wgs)))


def mask_scratch(partial: bool, slots: int, wgs: int, rows: int, cols: int):
  """[SMEM ring of packed masks, its ready barriers] (a stub without PARTIAL tiles)."""
  shape = (slots, wgs, cols // 32, rows) if partial else (1, 1, 1, 8)
  return [plgpu.SMEM(shape, jnp.int32), plgpu.Barrier(num_barriers=slots if partial else 1)]


def seg_stats(q_seg, kv_seg, block_q: int, block_kv: int):
  """Per-warpgroup-tile (q_min, q_max) [b, tq / block_q], (kv_min, kv_max) [b, tk / block_kv]."""
  return (*masks.segment_block_stats(q_seg, block_q),
          *masks.segment_block_stats(kv_seg, block_kv))


def tile_full(partial, stat_refs, batch, q_block, kv_block):
  """Traced bool: the tile needs no mask (not PARTIAL, and one shared segment)."""
  full = jnp.logical_not(partial)
  if stat_refs:
    q_min, q_max, kv_min, kv_max = stat_refs
    full = full & masks.segments_uniform(q_min[batch, q_block], q_max[batch, q_block],
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
      s = jnp.where(fgpu.segment_mask(*seg_ids, s.shape, transposed), s, -jnp.inf)
    return s
  return lax.cond(full, lambda x: x, masked, s)


def mask_stream(masks_ref, mask_ring, mask_ready, mask_id_of):
  """The memory warpgroup's stream of PARTIAL entries' element masks."""
  return Stream(lambda t: masks_ref.at[jnp.maximum(mask_id_of(t), 0)], mask_ring,
                mask_ready, when=lambda t: mask_id_of(t) >= 0)


def _fwd_kernel(*refs, kmap: KernelMap, group: int, scale: float, slots: int, ops: Ops,
                seg: bool, partial: bool):
  q_ref, k_ref, v_ref, index, mask_id, counts, masks_ref = refs[:7]
  n_in = 7 + (6 if seg else 0)
  q_seg_ref, kv_seg_ref, *stat_refs = refs[7:n_in] if seg else (None, None)
  (o_ref, lse_ref), scratch = refs[n_in:n_in + 2], list(refs[n_in + 2:])
  (q_smem, k_ring, v_ring, lse_smem, mask_ring, q_bar, k_ready, v_ready, k_consumed,
   v_consumed, mask_ready) = scratch[:11]
  if seg:
    q_ids_smem, kv_ids_ring, q_ids_bar, kv_ids_ready = scratch[11:]
  bq, bkv = q_smem.shape[1], k_ring.shape[1]
  head_dim = q_ref.shape[-1]
  b, h = lax.axis_index("batch"), lax.axis_index("heads")
  cta, wg = lax.axis_index("q_tiles"), lax.axis_index("wg")
  hm = lax.div(h, jnp.int32(kmap.head_div))
  num_steps = counts[hm, cta]
  kv_block_of = lambda t: index[hm, cta, t]
  mask_id_of = lambda t: mask_id[hm, cta, t]

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
      kv_block, slot = kv_block_of(t), slot_of(t, slots)
      plgpu.barrier_wait(k_ready.at[slot])
      s = ops.matmul_nt(q_smem.at[wg], k_ring.at[slot], (bq, bkv)) * (scale * LOG2E)
      if seg or partial:
        seg_ids = None
        if seg:
          plgpu.barrier_wait(kv_ids_ready.at[slot])
          seg_ids = (q_ids, ops.load_vector(kv_ids_ring.at[slot], axis=0))
        is_partial = mask_id_of(t) >= 0

        def load_tile():
          plgpu.barrier_wait(mask_ready.at[slot])
          return unpack_bits(ops, mask_ring.at[slot, wg], (bq, bkv))
        s = apply_mask(s, full=tile_full(is_partial, stat_refs, b, q_block, kv_block),
                       partial=is_partial, load_tile=load_tile, seg_ids=seg_ids,
                       transposed=False, needs_tile=partial)
      plgpu.barrier_arrive(k_consumed.at[slot])
      p, acc, m, l = fgpu.softmax_update(s, acc, m, l)
      plgpu.barrier_wait(v_ready.at[slot])
      acc = ops.matmul_acc(acc, p.astype(v_ring.dtype), v_ring.at[slot])
      plgpu.barrier_arrive(v_consumed.at[slot])
      return acc, m, l

    acc, m, l = lax.fori_loop(0, num_steps, step, fgpu.softmax_init(ops, bq, head_dim))
    out, lse = fgpu.softmax_result(acc, m, l)
    q_smem.at[wg][...] = out.astype(q_smem.dtype)
    lse_smem.at[wg][...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem.at[wg], o_ref.at[b, pl.ds(row0, bq), h])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _memory():
    ops.set_registers(compute=False)
    kv_head = lax.div(h, jnp.int32(group))
    rows = lambda t: pl.ds(kv_block_of(t) * bkv, bkv)
    streams = [Stream(lambda t: k_ref.at[b, rows(t), kv_head], k_ring, k_ready, k_consumed)]
    if partial:
      streams.append(mask_stream(masks_ref, mask_ring, mask_ready, mask_id_of))
    if seg:
      streams.append(Stream(lambda t: kv_seg_ref.at[b, rows(t)], kv_ids_ring, kv_ids_ready))
    streams.append(Stream(lambda t: v_ref.at[b, rows(t), kv_head], v_ring, v_ready,
                          v_consumed))
    produce_ring(streams, num_steps, slots)


def forward(q, k, v, q_seg, kv_seg, *, kmap: KernelMap, scale: float, slots: int,
            interpret):
  """(out [b, tq, h, d], lse [b, h, tq] f32 log2 units) over the tiles of kmap."""
  batch, q_len, num_heads, head_dim = q.shape
  rows, bkv = kmap.block_rows, kmap.block_cols
  bq = rows // COMPUTE_WGS
  slots = max(1, min(slots, kmap.max_steps))
  seg, partial = q_seg is not None, has_partial(kmap)
  dtype = q.dtype
  tiled = lambda shape: plgpu.SMEM(shape, dtype, transforms=TRANSFORMS)
  mask_ring, mask_ready = mask_scratch(partial, slots, COMPUTE_WGS, bq, bkv)
  scratch = [tiled((COMPUTE_WGS, bq, head_dim)), tiled((slots, bkv, head_dim)),
             tiled((slots, bkv, head_dim)), plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
             mask_ring, plgpu.Barrier(num_barriers=COMPUTE_WGS),
             plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
             plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
             plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots), mask_ready]
  operands = [q, k, v, *map_operands(kmap, COMPUTE_WGS)]
  if seg:
    scratch += [plgpu.SMEM((COMPUTE_WGS, bq), jnp.int32), plgpu.SMEM((slots, bkv), jnp.int32),
                plgpu.Barrier(num_barriers=COMPUTE_WGS), plgpu.Barrier(num_barriers=slots)]
    operands += [q_seg, kv_seg, *seg_stats(q_seg, kv_seg, bq, bkv)]
  kernel = plgpu.kernel(
      functools.partial(_fwd_kernel, kmap=kmap, group=num_heads // k.shape[2], scale=scale,
                        slots=slots, ops=Ops(interpret=bool(interpret)), seg=seg,
                        partial=partial),
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)],
      scratch_types=scratch,
      grid=(num_heads, q_len // rows, batch),
      grid_names=("heads", "q_tiles", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret or None,
  )
  return kernel(*operands)
