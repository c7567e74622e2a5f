"""Mosaic TPU block-sparse attention: forward, dq and dk/dv kernels.

Variants of flash_attention_tpu / _tpu_bwd (same layouts, same online-softmax
and gradient steps, imported from there) whose visited tiles come from a
KernelMap (block_sparse_map) instead of computed ranges. The map's index lists
are scalar-prefetched; the k/v (or q/do) index maps read the tile of each step
from them, so absent tiles cost neither DMA nor compute, and padded steps
repeat the last tile (no new DMA). FULL tiles skip every mask; PARTIAL tiles
read their int8 element mask (deduplicated, fetched by a block spec indexed by
`mask_fetch`, so runs of FULL tiles refetch nothing). Segment ids combine with
the map at run time: a tile whose query and key segment ranges do not meet is
skipped, one with a single shared segment needs no segment mask.

Layouts: q, do [b, h, tq, d]; k, v [b, k, tk, d]; lse, delta [b, h, tq] f32
(log2 units); tq, tk padded to the map's tiles.
"""

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels import flash_attention_masks as masks
from pallas_kernels import flash_attention_tpu as ftpu
from pallas_kernels import flash_attention_tpu_bwd as ftpu_bwd
from pallas_kernels.block_sparse_map import KernelMap
from pallas_kernels.flash_attention_tpu import LANES, SMEM_PREFETCH_WORDS, SUBLANES, widen


def _prefetch(kmap: KernelMap, q_seg, kv_seg, block_q: int, block_kv: int):
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
  stats = (*masks.segment_block_stats(q_seg, block_q),
           *masks.segment_block_stats(kv_seg, block_kv))
  return tuple(x.reshape(-1) for x in stats)


class _Entry:
  """Scalars of map entry `step` of row `row` (traced, from prefetch refs)."""

  def __init__(self, kmap: KernelMap, refs, head, row, step):
    index, mask_id, _, counts = refs
    h = head // kmap.head_div
    off = (h * kmap.num_rows + row) * kmap.max_steps + step
    self.col = index[off]
    self.partial = mask_id[off] >= 0
    self.run = step < counts[h * kmap.num_rows + row]


def _index_fns(kmap: KernelMap):
  """Index-map helpers: (column tile, mask to fetch) of (head, row, step)."""
  def off(head, row, step):
    return ((head // kmap.head_div) * kmap.num_rows + row) * kmap.max_steps + step
  col = lambda refs, head, row, step: refs[0][off(head, row, step)]
  fetch = lambda refs, head, row, step: refs[2][off(head, row, step)]
  return col, fetch


def _tile_flags(entry: _Entry, seg_refs, batch, q_tile, kv_tile, nq: int, nk: int):
  """(run, full) of a visited tile, with segments: overlap to run, uniform for full."""
  run, full = entry.run, jnp.logical_not(entry.partial)
  if seg_refs:
    q_min, q_max, kv_min, kv_max = seg_refs
    qi = batch * nq + jnp.minimum(q_tile, nq - 1)
    ki = batch * nk + jnp.minimum(kv_tile, nk - 1)
    run = run & (kv_min[ki] <= q_max[qi]) & (kv_max[ki] >= q_min[qi])
    full = full & masks.segments_uniform(q_min[qi], q_max[qi], kv_min[ki], kv_max[ki])
  return run, full


def _mask_tile(mask_ref, partial, seg_mask):
  """bool tile: the element mask where the tile is PARTIAL, and segment equality."""
  vis = (mask_ref[...] != 0) | jnp.logical_not(partial)
  return vis if seg_mask is None else vis & seg_mask


def _needs_mask(kmap, has_segments):
  return _has_partial(kmap) or has_segments


def _fwd_kernel(*refs, kmap: KernelMap, has_segments: bool, scale: float, nk: int):
  n_seg = 4 if has_segments else 0
  map_refs, seg_refs, rest = refs[:4], refs[4:4 + n_seg], refs[4 + n_seg:]
  if has_segments:
    q_ref, k_ref, v_ref, mask_ref, q_ids, kv_ids, o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
  else:
    q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
  b, h, i, j = (pl.program_id(n) for n in range(4))
  entry = _Entry(kmap, map_refs, h, i, j)
  pl.when(j == 0)(lambda: ftpu.softmax_init(m_ref, l_ref, acc_ref))

  def step(masked: bool):
    s = ftpu.log2_scores(q_ref[...], k_ref[...], scale)
    if masked:
      seg = None
      if has_segments:
        seg = widen(q_ids[...], s.shape[1]) == kv_ids[:1, :]
      s = jnp.where(_mask_tile(mask_ref, entry.partial, seg), s, -jnp.inf)
    ftpu.softmax_step(s, v_ref[...], m_ref, l_ref, acc_ref)

  run, full = _tile_flags(entry, seg_refs, b, i, entry.col, kmap.num_rows, nk)
  ftpu.run_tile(run, full, _needs_mask(kmap, has_segments), step)
  pl.when(j == kmap.max_steps - 1)(
      lambda: ftpu.softmax_finish(o_ref, lse_ref, m_ref, l_ref, acc_ref))


def forward(q, k, v, q_seg, kv_seg, *, kmap: KernelMap, scale: float, interpret):
  """(out [b, h, tq, d], lse [b, h, tq] f32 log2 units) over the tiles of kmap."""
  batch, num_heads, q_len, head_dim = q.shape
  bq, bkv, nq = kmap.block_rows, kmap.block_cols, kmap.num_rows
  nk, group = k.shape[2] // bkv, num_heads // k.shape[1]
  col, fetch = _index_fns(kmap)
  q_map = lambda b, h, i, j, *_: (b, h, i, 0)
  kv_map = lambda b, h, i, j, *refs: (b, h // group, col(refs, h, i, j), 0)
  mask_map = lambda b, h, i, j, *refs: (fetch(refs, h, i, j), 0, 0)
  in_specs = [pl.BlockSpec((None, None, bq, head_dim), q_map),
              pl.BlockSpec((None, None, bkv, head_dim), kv_map),
              pl.BlockSpec((None, None, bkv, head_dim), kv_map),
              pl.BlockSpec((None, bq, bkv), mask_map)]
  operands = [q, k, v, jnp.asarray(kmap.partial_masks)]
  prefetch = _prefetch(kmap, q_seg, kv_seg, bq, bkv)
  if q_seg is not None:
    in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
                 pl.BlockSpec((None, SUBLANES, bkv),
                              lambda b, h, i, j, *refs: (b, 0, col(refs, h, i, j)))]
    operands += [ftpu.lane_replicated(q_seg), ftpu.sublane_replicated(kv_seg)]
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
      compiler_params=ftpu.compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_attention_fwd",
  )(*prefetch, *operands)
  return out, lse[:, :, 0, :]


def _dq_kernel(*refs, kmap: KernelMap, has_segments: bool, scale: float, nk: int):
  n_seg = 4 if has_segments else 0
  map_refs, seg_refs, rest = refs[:4], refs[4:4 + n_seg], refs[4 + n_seg:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, mask_ref = rest[:7]
  ids, rest = (rest[7:9], rest[9:]) if has_segments else ((), rest[7:])
  dq_ref, acc_ref, lse_col, delta_col = rest
  b, h, i, j = (pl.program_id(n) for n in range(4))
  entry = _Entry(kmap, map_refs, h, i, j)

  @pl.when(j == 0)
  def _init():
    ftpu_bwd.dq_init(acc_ref, lse_col, delta_col, lse_ref, delta_ref)

  def step(masked: bool):
    mask = None
    if masked:
      seg = None
      if has_segments:
        seg = widen(ids[0][...], k_ref.shape[0]) == ids[1][:1, :]
      mask = _mask_tile(mask_ref, entry.partial, seg)
    ftpu_bwd.dq_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_col[...],
                     delta_col[...], acc_ref, scale=scale, mask=mask)

  run, full = _tile_flags(entry, seg_refs, b, i, entry.col, kmap.num_rows, nk)
  ftpu.run_tile(run, full, _needs_mask(kmap, has_segments), step)

  @pl.when(j == kmap.max_steps - 1)
  def _finish():
    ftpu_bwd.dq_finish(dq_ref, acc_ref, scale)


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, *, kmap: KernelMap, scale: float,
                interpret):
  """dq [b, h, tq, d] over the tiles of kmap (the dq map)."""
  batch, num_heads, _, head_dim = q.shape
  bq, bkv, nq = kmap.block_rows, kmap.block_cols, kmap.num_rows
  nk, group = k.shape[2] // bkv, num_heads // k.shape[1]
  col, fetch = _index_fns(kmap)
  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bkv, head_dim),
                         lambda b, h, i, j, *refs: (b, h // group, col(refs, h, i, j), 0))
  row_spec = pl.BlockSpec((None, None, SUBLANES, bq), lambda b, h, i, j, *_: (b, h, 0, i))
  mask_spec = pl.BlockSpec((None, bq, bkv),
                           lambda b, h, i, j, *refs: (fetch(refs, h, i, j), 0, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, mask_spec]
  operands = [q, k, v, do, ftpu.sublane_replicated(lse), ftpu.sublane_replicated(delta),
              jnp.asarray(kmap.partial_masks)]
  prefetch = _prefetch(kmap, q_seg, kv_seg, bq, bkv)
  if q_seg is not None:
    in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
                 pl.BlockSpec((None, SUBLANES, bkv),
                              lambda b, h, i, j, *refs: (b, 0, col(refs, h, i, j)))]
    operands += [ftpu.lane_replicated(q_seg), ftpu.sublane_replicated(kv_seg)]
  return pl.pallas_call(
      functools.partial(_dq_kernel, kmap=kmap, has_segments=q_seg is not None, scale=scale,
                        nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch), grid=(batch, num_heads, nq, kmap.max_steps),
          in_specs=in_specs, out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32),
                          pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, LANES), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=ftpu.compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_attention_dq",
  )(*prefetch, *operands)


def _dkv_kernel(*refs, kmap: KernelMap, has_segments: bool, scale: float, nq: int):
  n_seg = 4 if has_segments else 0
  map_refs, seg_refs, rest = refs[:4], refs[4:4 + n_seg], refs[4 + n_seg:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, mask_ref = rest[:7]
  ids, rest = (rest[7:9], rest[9:]) if has_segments else ((), rest[7:])
  dk_ref, dv_ref, dk_acc, dv_acc = rest
  b, kh, j, t = (pl.program_id(n) for n in range(4))
  entry = _Entry(kmap, map_refs, kh, j, t)

  @pl.when(t == 0)
  def _init():
    ftpu_bwd.dkv_init(dk_acc, dv_acc)

  def step(masked: bool):
    mask = None
    if masked:
      seg = None
      if has_segments:
        seg = ids[0][:1, :] == widen(ids[1][...], q_ref.shape[0])
      mask = _mask_tile(mask_ref, entry.partial, seg)
    ftpu_bwd.dkv_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[:1, :],
                      delta_ref[:1, :], dk_acc, dv_acc, scale=scale, mask=mask)

  q_tile = _rem(entry.col, nq)
  run, full = _tile_flags(entry, seg_refs, b, q_tile, j, nq, kmap.num_rows)
  ftpu.run_tile(run, full, _needs_mask(kmap, has_segments), step)

  @pl.when(t == kmap.max_steps - 1)
  def _finish():
    ftpu_bwd.dkv_finish(dk_ref, dv_ref, dk_acc, dv_acc, scale)


def _rem(x, n: int):
  return jax.lax.rem(x, jnp.int32(n))


def backward_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, *, kmap: KernelMap, scale: float,
                 interpret):
  """(dk, dv) [b, k, tk, d], summed over each kv head's query heads (the dkv map)."""
  batch, num_kv_heads, _, head_dim = k.shape
  bkv, bq, nk = kmap.block_rows, kmap.block_cols, kmap.num_rows
  nq, group = q.shape[2] // bq, q.shape[1] // num_kv_heads
  col, fetch = _index_fns(kmap)

  def q_of(refs, kh, j, t):  # (query head, query tile) of an entry.
    e = col(refs, kh, j, t)
    return kh * group + jax.lax.div(e, jnp.int32(nq)), _rem(e, nq)

  def q_map(b, kh, j, t, *refs):
    head, tile = q_of(refs, kh, j, t)
    return b, head, tile, 0

  def row_map(b, kh, j, t, *refs):
    head, tile = q_of(refs, kh, j, t)
    return b, head, 0, tile

  q_spec = pl.BlockSpec((None, None, bq, head_dim), q_map)
  kv_spec = pl.BlockSpec((None, None, bkv, head_dim), lambda b, kh, j, t, *_: (b, kh, j, 0))
  row_spec = pl.BlockSpec((None, None, SUBLANES, bq), row_map)
  mask_spec = pl.BlockSpec((None, bkv, bq),
                           lambda b, kh, j, t, *refs: (fetch(refs, kh, j, t), 0, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, mask_spec]
  operands = [q, k, v, do, ftpu.sublane_replicated(lse), ftpu.sublane_replicated(delta),
              jnp.asarray(kmap.partial_masks)]
  prefetch = _prefetch(kmap, q_seg, kv_seg, bq, bkv)
  if q_seg is not None:
    in_specs += [pl.BlockSpec((None, SUBLANES, bq),
                              lambda b, kh, j, t, *refs: (b, 0, q_of(refs, kh, j, t)[1])),
                 pl.BlockSpec((None, bkv, LANES), lambda b, kh, j, t, *_: (b, j, 0))]
    operands += [ftpu.sublane_replicated(q_seg), ftpu.lane_replicated(kv_seg)]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, kmap=kmap, has_segments=q_seg is not None, scale=scale,
                        nq=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch), grid=(batch, num_kv_heads, nk, kmap.max_steps),
          in_specs=in_specs, out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bkv, head_dim), jnp.float32),
                          pltpu.VMEM((bkv, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=ftpu.compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_attention_dkv",
  )(*prefetch, *operands)
  return dk, dv
