"""Mosaic TPU block-sparse attention backward: dq and dk/dv kernels.

Legend: layers/__init__.py. flash_attention/tpu_bwd.py's scheme (the tile
steps of common/tpu_steps_bwd.py) over the dq and dkv KernelMaps, read as the
forward reads its map (tpu.py: scalar-prefetched entries, FULL / PARTIAL
tiles, segment ids at run time). The dk/dv map's entries name (query head in
the group, query tile) pairs, so dk and dv come out summed over the GQA group.

Layouts: q, do [b, h, t, d]; k, v [b, k, s, d]; lse, delta [b, h, t] f32 (log2
units); t and s padded to the maps' tiles.
"""

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.block_sparse.block_map import KernelMap
from pallas_kernels.block_sparse.tpu import (Entry, index_fns, mask_tile, needs_mask,
                                             prefetch_operands, tile_flags)
from pallas_kernels.common.tpu import (LANES, SUBLANES, compiler_params, lane_replicated,
                                       run_tile, sublane_replicated, widen)
from pallas_kernels.common.tpu_steps_bwd import (dkv_finish, dkv_init, dkv_step, dq_finish,
                                                 dq_init, dq_step)


def _dq_kernel(*refs, kmap: KernelMap, has_segments: bool, scale: float, nk: int):
  n_seg = 4 if has_segments else 0
  map_refs, seg_refs, rest = refs[:4], refs[4:4 + n_seg], refs[4 + n_seg:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, mask_ref = rest[:7]
  ids, rest = (rest[7:9], rest[9:]) if has_segments else ((), rest[7:])
  dq_ref, acc_ref, lse_col, delta_col = rest
  b, h, i, j = (pl.program_id(n) for n in range(4))
  entry = Entry(kmap, map_refs, h, i, j)

  @pl.when(j == 0)
  def _init():
    dq_init(acc_ref, lse_col, delta_col, lse_ref, delta_ref)

  def step(masked: bool):
    mask = None
    if masked:
      seg = None
      if has_segments:
        seg = widen(ids[0][...], k_ref.shape[0]) == ids[1][:1, :]
      mask = mask_tile(mask_ref, entry.partial, seg)
    dq_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_col[...],
            delta_col[...], acc_ref, scale=scale, mask=mask)

  run, full = tile_flags(entry, seg_refs, b, i, entry.col, kmap.num_rows, nk)
  run_tile(run, full, needs_mask(kmap, has_segments), step)

  @pl.when(j == kmap.max_steps - 1)
  def _finish():
    dq_finish(dq_ref, acc_ref, scale)


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, *, kmap: KernelMap, scale: float,
                interpret):
  """dq [b, h, t, d] over the tiles of kmap (the dq map)."""
  batch, num_heads, _, head_dim = q.shape
  bq, bkv, nq = kmap.block_rows, kmap.block_cols, kmap.num_rows
  nk, group = k.shape[2] // bkv, num_heads // k.shape[1]
  col, fetch = index_fns(kmap)
  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bkv, head_dim),
                         lambda b, h, i, j, *refs: (b, h // group, col(refs, h, i, j), 0))
  row_spec = pl.BlockSpec((None, None, SUBLANES, bq), lambda b, h, i, j, *_: (b, h, 0, i))
  mask_spec = pl.BlockSpec((None, bq, bkv),
                           lambda b, h, i, j, *refs: (fetch(refs, h, i, j), 0, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, mask_spec]
  operands = [q, k, v, do, sublane_replicated(lse), sublane_replicated(delta),
              jnp.asarray(kmap.partial_masks)]
  prefetch = prefetch_operands(kmap, q_seg, kv_seg, bq, bkv)
  if q_seg is not None:
    in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
                 pl.BlockSpec((None, SUBLANES, bkv),
                              lambda b, h, i, j, *refs: (b, 0, col(refs, h, i, j)))]
    operands += [lane_replicated(q_seg), sublane_replicated(kv_seg)]
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
      compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
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
  entry = Entry(kmap, map_refs, kh, j, t)

  @pl.when(t == 0)
  def _init():
    dkv_init(dk_acc, dv_acc)

  def step(masked: bool):
    mask = None
    if masked:
      seg = None
      if has_segments:
        seg = ids[0][:1, :] == widen(ids[1][...], q_ref.shape[0])
      mask = mask_tile(mask_ref, entry.partial, seg)
    dkv_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[:1, :],
             delta_ref[:1, :], dk_acc, dv_acc, scale=scale, mask=mask)

  q_tile = _rem(entry.col, nq)
  run, full = tile_flags(entry, seg_refs, b, q_tile, j, nq, kmap.num_rows)
  run_tile(run, full, needs_mask(kmap, has_segments), step)

  @pl.when(t == kmap.max_steps - 1)
  def _finish():
    dkv_finish(dk_ref, dv_ref, dk_acc, dv_acc, scale)


def _rem(x, n: int):
  return jax.lax.rem(x, jnp.int32(n))


def backward_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, *, kmap: KernelMap, scale: float,
                 interpret):
  """(dk, dv) [b, k, s, d], summed over each kv head's query heads (the dkv map)."""
  batch, num_kv_heads, _, head_dim = k.shape
  bkv, bq, nk = kmap.block_rows, kmap.block_cols, kmap.num_rows
  nq, group = q.shape[2] // bq, q.shape[1] // num_kv_heads
  col, fetch = index_fns(kmap)

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
  operands = [q, k, v, do, sublane_replicated(lse), sublane_replicated(delta),
              jnp.asarray(kmap.partial_masks)]
  prefetch = prefetch_operands(kmap, q_seg, kv_seg, bq, bkv)
  if q_seg is not None:
    in_specs += [pl.BlockSpec((None, SUBLANES, bq),
                              lambda b, kh, j, t, *refs: (b, 0, q_of(refs, kh, j, t)[1])),
                 pl.BlockSpec((None, bkv, LANES), lambda b, kh, j, t, *_: (b, j, 0))]
    operands += [sublane_replicated(q_seg), lane_replicated(kv_seg)]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, kmap=kmap, has_segments=q_seg is not None, scale=scale,
                        nq=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch), grid=(batch, num_kv_heads, nk, kmap.max_steps),
          in_specs=in_specs, out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bkv, head_dim), jnp.float32),
                          pltpu.VMEM((bkv, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_attention_dkv",
  )(*prefetch, *operands)
  return dk, dv
