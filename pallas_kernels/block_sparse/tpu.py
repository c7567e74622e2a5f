"""Mosaic TPU block-sparse attention forward kernel, and the map helpers its backward shares.

Legend: layers/__init__.py. The flash kernels' layouts and tile steps
(common/tpu_steps.py, common/tpu_steps_bwd.py), with the visited tiles read
from a KernelMap (block_map.py) instead of computed ranges. The map's index
lists are scalar-prefetched; the k/v (or q/do) index maps read the tile of each
step from them, so absent tiles cost neither DMA nor compute, and padded steps
repeat the last tile (no new DMA). FULL tiles skip every mask; PARTIAL tiles
read their int8 element mask (deduplicated, fetched by a block spec indexed by
`mask_fetch`, so runs of FULL tiles refetch nothing). Segment ids combine with
the map at run time: a tile whose query and key segment ranges do not meet is
skipped, one with a single shared segment needs no segment mask.

Layouts: q, do [b, h, t, d]; k, v [b, k, s, d]; lse, delta [b, h, t] f32 (log2
units); t and s padded to the map's tiles.
"""

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse.block_map import KernelMap
from pallas_kernels.common import masking
from pallas_kernels.common.tpu import (LANES, SMEM_PREFETCH_WORDS, SUBLANES, compiler_params,
                                       lane_replicated, run_tile, sublane_replicated, widen)
from pallas_kernels.common.tpu_steps import (log2_scores, softmax_finish, softmax_init,
                                             softmax_step)


def prefetch_operands(kmap: KernelMap, q_seg, kv_seg, block_q: int, block_kv: int):
  """Scalar-prefetch operands: the map's arrays, then the segment statistics.

  Raises:
    ValueError: when they would not fit the SMEM_PREFETCH_WORDS budget.
  """
  arrays = tuple(jnp.asarray(x) for x in kmap.arrays())
  if q_seg is not None:
    arrays += _seg_stats(q_seg, kv_seg, block_q, block_kv)
  words = sum(x.size for x in arrays)
  if words > SMEM_PREFETCH_WORDS:
    raise ValueError(
        f"the block map and segment statistics need {words} int32 words of TPU SMEM, over "
        f"the {SMEM_PREFETCH_WORDS} a call may prefetch: use larger tiles "
        "(config.block_q / block_kv and their dq/dkv twins), share one mask across heads, or "
        "shard heads or batch over more devices.")
  return arrays


def _has_partial(kmap: KernelMap) -> bool:
  return bool(np.any(kmap.mask_id >= 0))


def _seg_stats(q_seg, kv_seg, block_q: int, block_kv: int):
  """Flattened per-tile (q_min, q_max, kv_min, kv_max) for scalar prefetch."""
  stats = (*masking.segment_block_stats(q_seg, block_q),
           *masking.segment_block_stats(kv_seg, block_kv))
  return tuple(x.reshape(-1) for x in stats)


class Entry:
  """Scalars of map entry `step` of row `row` (traced, from prefetch refs)."""

  def __init__(self, kmap: KernelMap, refs, head, row, step):
    index, mask_id, _, counts = refs
    h = head // kmap.head_div
    off = (h * kmap.num_rows + row) * kmap.max_steps + step
    self.col = index[off]
    self.partial = mask_id[off] >= 0
    self.run = step < counts[h * kmap.num_rows + row]


def index_fns(kmap: KernelMap):
  """Index-map helpers: (column tile, mask to fetch) of (head, row, step)."""
  def off(head, row, step):
    return ((head // kmap.head_div) * kmap.num_rows + row) * kmap.max_steps + step
  col = lambda refs, head, row, step: refs[0][off(head, row, step)]
  fetch = lambda refs, head, row, step: refs[2][off(head, row, step)]
  return col, fetch


def tile_flags(entry: Entry, seg_refs, batch, q_tile, kv_tile, nq: int, nk: int):
  """(run, full) of a visited tile, with segments: overlap to run, uniform for full."""
  run, full = entry.run, jnp.logical_not(entry.partial)
  if seg_refs:
    q_min, q_max, kv_min, kv_max = seg_refs
    qi = batch * nq + jnp.minimum(q_tile, nq - 1)
    ki = batch * nk + jnp.minimum(kv_tile, nk - 1)
    run = run & (kv_min[ki] <= q_max[qi]) & (kv_max[ki] >= q_min[qi])
    full = full & masking.segments_uniform(q_min[qi], q_max[qi], kv_min[ki], kv_max[ki])
  return run, full


def mask_tile(mask_ref, partial, seg_mask):
  """bool tile: the element mask where the tile is PARTIAL, and segment equality."""
  vis = (mask_ref[...] != 0) | jnp.logical_not(partial)
  return vis if seg_mask is None else vis & seg_mask


def needs_mask(kmap, has_segments):
  return _has_partial(kmap) or has_segments


def _fwd_kernel(*refs, kmap: KernelMap, has_segments: bool, scale: float, nk: int):
  n_seg = 4 if has_segments else 0
  map_refs, seg_refs, rest = refs[:4], refs[4:4 + n_seg], refs[4 + n_seg:]
  if has_segments:
    q_ref, k_ref, v_ref, mask_ref, q_ids, kv_ids, o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
  else:
    q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
  b, h, i, j = (pl.program_id(n) for n in range(4))
  entry = Entry(kmap, map_refs, h, i, j)
  pl.when(j == 0)(lambda: softmax_init(m_ref, l_ref, acc_ref))

  def step(masked: bool):
    s = log2_scores(q_ref[...], k_ref[...], scale)
    if masked:
      seg = None
      if has_segments:
        seg = widen(q_ids[...], s.shape[1]) == kv_ids[:1, :]
      s = jnp.where(mask_tile(mask_ref, entry.partial, seg), s, -jnp.inf)
    softmax_step(s, v_ref[...], m_ref, l_ref, acc_ref)

  run, full = tile_flags(entry, seg_refs, b, i, entry.col, kmap.num_rows, nk)
  run_tile(run, full, needs_mask(kmap, has_segments), step)
  pl.when(j == kmap.max_steps - 1)(
      lambda: softmax_finish(o_ref, lse_ref, m_ref, l_ref, acc_ref))


def forward(q, k, v, q_seg, kv_seg, *, kmap: KernelMap, scale: float, interpret):
  """(out [b, h, t, d], lse [b, h, t] f32 log2 units) over the tiles of kmap."""
  batch, num_heads, q_len, head_dim = q.shape
  bq, bkv, nq = kmap.block_rows, kmap.block_cols, kmap.num_rows
  nk, group = k.shape[2] // bkv, num_heads // k.shape[1]
  col, fetch = index_fns(kmap)
  q_map = lambda b, h, i, j, *_: (b, h, i, 0)
  kv_map = lambda b, h, i, j, *refs: (b, h // group, col(refs, h, i, j), 0)
  mask_map = lambda b, h, i, j, *refs: (fetch(refs, h, i, j), 0, 0)
  in_specs = [pl.BlockSpec((None, None, bq, head_dim), q_map),
              pl.BlockSpec((None, None, bkv, head_dim), kv_map),
              pl.BlockSpec((None, None, bkv, head_dim), kv_map),
              pl.BlockSpec((None, bq, bkv), mask_map)]
  operands = [q, k, v, jnp.asarray(kmap.partial_masks)]
  prefetch = prefetch_operands(kmap, q_seg, kv_seg, bq, bkv)
  if q_seg is not None:
    in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
                 pl.BlockSpec((None, SUBLANES, bkv),
                              lambda b, h, i, j, *refs: (b, 0, col(refs, h, i, j)))]
    operands += [lane_replicated(q_seg), sublane_replicated(kv_seg)]
  out_specs = [pl.BlockSpec((None, None, bq, head_dim), q_map),
               pl.BlockSpec((None, None, SUBLANES, bq), lambda b, h, i, j, *_: (b, h, 0, i))]
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, kmap=kmap, has_segments=q_seg is not None,
                        scale=scale, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch), grid=(batch, num_heads, nq, kmap.max_steps),
          in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, SUBLANES, q_len), jnp.float32)],
      compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_attention_fwd",
  )(*prefetch, *operands)
  return out, lse[:, :, 0, :]
