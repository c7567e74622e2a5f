"""Mosaic TPU selected-block attention backward: a dq kernel and a dk/dv kernel.

Legend: layers/__init__.py. Layouts and the dq grid (b, k, t, ns) are the
forward's (tpu.py); the tile steps are common/tpu_steps_bwd.py's.

dk/dv are scatter-free: an XLA prologue (tpu_core.pair_list) lists every (kv
block, query) pair of a kv head sorted by block, with one extra no-op pair per
block so that every block is visited (its output written, zeros if nobody
chose it). The dkv grid (b, k, pairs) walks that list; consecutive steps of one
block keep the same output block resident, accumulate in VMEM, and write it
once at the block's last pair.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.common.tpu import LANES, SUBLANES, compiler_params, widen
from pallas_kernels.common.tpu_steps_bwd import (dkv_finish, dkv_init, dkv_step, dq_finish,
                                                 dq_init, dq_step)
from pallas_kernels.nsa_selection.tpu import (Geometry, prefetch_operands, query_specs,
                                              slot_index, split_refs, tile_mask)


def _dq_kernel(*refs, geo: Geometry):
  (blk_ref, act_ref, q_off, q_seg_ref), ins, kv_seg_ref, rest = split_refs(
      refs, geo.has_segments, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
  dq_ref, acc_ref, lse_col, delta_col = rest
  b, kh, i, j = (pl.program_id(a) for a in range(4))
  g, bk = geo.group, geo.block
  slot = slot_index(geo, b, kh, i, j)

  @pl.when(j == 0)
  def _init():
    dq_init(acc_ref, lse_col, delta_col, lse_ref, delta_ref)

  @pl.when(act_ref[slot] != 0)
  def _step():
    kv_pos = blk_ref[slot] * bk + lax.broadcasted_iota(jnp.int32, (g, bk), 1)
    seg = (q_seg_ref[b * geo.q_len + i], kv_seg_ref[:1, :]) if geo.has_segments else (None,) * 2
    dq_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_col[...], delta_col[...],
            acc_ref, scale=geo.scale, mask=tile_mask(geo, q_off[0] + i, kv_pos, *seg))

  @pl.when(j == geo.top_n - 1)
  def _finish():
    dq_finish(dq_ref, acc_ref, geo.scale)


def backward_dq(q, k, v, do, lse, delta, blk, act, q_offset, q_seg, kv_seg, *, geo: Geometry,
                interpret):
  """dq [b, k, t, g, d]; lse, delta [b, k, t, 8, g] rows; the rest as in `forward`."""
  batch, num_kv, t, g, head_dim = q.shape
  q_spec, kv_spec, row_spec, seg_spec = query_specs(geo, head_dim)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  operands = [q, k, v, do, lse, delta]
  if geo.has_segments:
    in_specs.append(seg_spec)
    operands.append(kv_seg)
  prefetch = prefetch_operands(blk, act, q_offset, q_seg)
  return pl.pallas_call(
      functools.partial(_dq_kernel, geo=geo),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=(batch, num_kv, t, geo.top_n),
          in_specs=in_specs, out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((g, head_dim), jnp.float32),
                          pltpu.VMEM((g, LANES), jnp.float32),
                          pltpu.VMEM((g, LANES), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="nsa_selection_dq",
  )(*prefetch, *operands)


def _dkv_kernel(*refs, geo: Geometry):
  (pair_blk, pair_q, q_off, q_seg_ref), ins, kv_seg_ref, rest = split_refs(
      refs, geo.has_segments, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
  dk_ref, dv_ref, dk_acc, dv_acc = rest
  b, kh, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  g, bk, num_pairs = geo.group, geo.block, geo.num_pairs
  base = (b * geo.num_kv_heads + kh) * num_pairs
  blk, qi = pair_blk[base + p], pair_q[base + p]
  first = (p == 0) | (pair_blk[base + jnp.maximum(p - 1, 0)] != blk)
  last = (p == num_pairs - 1) | (pair_blk[base + jnp.minimum(p + 1, num_pairs - 1)] != blk)

  @pl.when(first)
  def _init():
    dkv_init(dk_acc, dv_acc)

  @pl.when(qi >= 0)
  def _step():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    if g < SUBLANES:
      # Products with g (< 8) rows or columns run in f32: Mosaic fails to verify
      # the bf16 forms of a 1-row operand (MHA).
      q, k, v, do = (x.astype(jnp.float32) for x in (q, k, v, do))
    kv_pos = blk * bk + lax.broadcasted_iota(jnp.int32, (bk, g), 0)
    seg = (None, None)
    if geo.has_segments:
      seg = (q_seg_ref[b * geo.q_len + qi], widen(kv_seg_ref[...], g))
    dkv_step(q, k, v, do, lse_ref[:1, :], delta_ref[:1, :], dk_acc, dv_acc, scale=geo.scale,
             mask=tile_mask(geo, q_off[0] + qi, kv_pos, *seg))

  @pl.when(last)
  def _finish():
    dkv_finish(dk_ref, dv_ref, dk_acc, dv_acc, geo.scale)


def backward_dkv(q, k, v, do, lse, delta, pair_blk, pair_q, q_offset, q_seg, kv_seg_col, *,
                 geo: Geometry, interpret):
  """(dk, dv) [b, k, nb·B, d] float32, summed over the group's heads and the call's queries.

  Args:
    pair_blk, pair_q: int32 [b * k * pairs]: per (batch, kv head) the pair
      list sorted by block; pair_q is the query's index in the call (its
      position minus q_offset), -1 for a no-op.
    q_offset: int32 [1], position of the call's first query.
    kv_seg_col: int32 [b, nb·B, 128] lane-replicated kv segment ids, or None.
    The rest as in `backward_dq`.
  """
  batch, num_kv, t, g, head_dim = q.shape
  bk, num_pairs = geo.block, geo.num_pairs

  def pair(b, kh, p, blk_ref, q_ref):
    base = (b * num_kv + kh) * num_pairs + p
    return blk_ref[base], jnp.maximum(q_ref[base], 0)

  def q_map(b, kh, p, *pre):
    return b, kh, pair(b, kh, p, *pre[:2])[1], 0, 0

  def kv_map(b, kh, p, *pre):
    return b, kh, pair(b, kh, p, *pre[:2])[0], 0

  def seg_map(b, kh, p, *pre):
    return b, pair(b, kh, p, *pre[:2])[0], 0

  q_spec = pl.BlockSpec((None, None, None, g, head_dim), q_map)
  row_spec = pl.BlockSpec((None, None, None, SUBLANES, g), q_map)
  kv_spec = pl.BlockSpec((None, None, bk, head_dim), kv_map)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  operands = [q, k, v, do, lse, delta]
  if geo.has_segments:
    in_specs.append(pl.BlockSpec((None, bk, LANES), seg_map))
    operands.append(kv_seg_col)
  prefetch = prefetch_operands(pair_blk, pair_q, q_offset, q_seg)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, geo=geo),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=(batch, num_kv, num_pairs),
          in_specs=in_specs, out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32),
                          pltpu.VMEM((bk, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, jnp.float32),
                 jax.ShapeDtypeStruct(v.shape, jnp.float32)],
      compiler_params=compiler_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="nsa_selection_dkv",
  )(*prefetch, *operands)
