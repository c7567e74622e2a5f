"""Mosaic TPU flash attention backward: a dq kernel and a dk/dv kernel.

Legend: layers/__init__.py. Both recompute probabilities from the forward's
log-sum-exp (log2 units) with the tile steps of common/tpu_steps_bwd.py:
p = exp2(s - lse), dp = do v^T, ds = p (dp - delta) with delta = rowsum(do o),
dq = scale ds k, dk = scale ds^T q, dv = p^T do.

The dk/dv kernel works on transposed tiles (kv rows, q columns), so per-query
statistics are sublane-replicated rows, and loops over the query heads of its
kv head (GQA) inside the grid: dk/dv come out already summed over the group.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.common import masking
from pallas_kernels.common.masking import Tiling
from pallas_kernels.common.tpu import (LANES, SUBLANES, compiler_params, lane_replicated,
                                       run_tile, sublane_replicated, widen)
from pallas_kernels.common.tpu_steps_bwd import (dkv_finish, dkv_init, dkv_step, dq_finish,
                                                 dq_init, dq_step)
from pallas_kernels.flash_attention import tpu as fwd_lib


def _split_refs(refs, n_prefetch, has_segments, n_in_main, n_out):
  prefetch, rest = refs[:n_prefetch], refs[n_prefetch:]
  main, rest = rest[:n_in_main], rest[n_in_main:]
  seg = ()
  if has_segments:
    seg, rest = rest[:2], rest[2:]
  return prefetch, main, seg, rest[:n_out], rest[n_out:]


def _dq_kernel(*refs, tiling: Tiling, num_steps: int):
  """One (batch, q head, q block, kv step) of dq."""
  n_pre = 2 + (4 if tiling.has_segments else 0)
  prefetch, main, seg, outs, scratch = _split_refs(refs, n_pre, tiling.has_segments, 6, 1)
  kv_lo, kv_hi, *seg_stats = prefetch
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = main
  (dq_ref,), (acc_ref, lse_col, delta_col) = outs, scratch
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  bq, bkv = tiling.block_q, tiling.block_kv
  lo, hi = kv_lo[b * tiling.num_q_blocks + i], kv_hi[b * tiling.num_q_blocks + i]
  kv_block = lo + j

  @pl.when(j == 0)
  def _init():
    dq_init(acc_ref, lse_col, delta_col, lse_ref, delta_ref)

  def step(masked: bool):
    mask = None
    if masked:
      rows = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bkv), 0)
      cols = kv_block * bkv + lax.broadcasted_iota(jnp.int32, (bq, bkv), 1)
      extra = {}
      if seg:
        extra = dict(q_seg=widen(seg[0][...], bkv), kv_seg=seg[1][:1, :])
      mask = masking.visible(rows, cols, window=tiling.window,
                             kv_len=tiling.padded_kv, **extra)
    dq_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_col[...], delta_col[...],
            acc_ref, scale=tiling.scale, mask=mask)

  full = fwd_lib.tile_is_full(tiling, i, kv_block, seg_stats, b)
  run_tile(kv_block < hi, full, tiling.needs_mask, step)

  @pl.when(j == num_steps - 1)
  def _finish():
    dq_finish(dq_ref, acc_ref, tiling.scale)


def _dkv_kernel(*refs, tiling: Tiling, num_steps: int):
  """One (batch, kv head, kv block, q head in group, q step) of dk and dv."""
  n_pre = 2 + (4 if tiling.has_segments else 0)
  prefetch, main, seg, outs, scratch = _split_refs(refs, n_pre, tiling.has_segments, 6, 2)
  q_lo, q_hi, *seg_stats = prefetch
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = main
  (dk_ref, dv_ref), (dk_acc, dv_acc) = outs, scratch
  b, j, g, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  bq, bkv = tiling.block_q, tiling.block_kv
  lo, hi = q_lo[b * tiling.num_kv_blocks + j], q_hi[b * tiling.num_kv_blocks + j]
  q_block = lo + t

  @pl.when((g == 0) & (t == 0))
  def _init():
    dkv_init(dk_acc, dv_acc)

  def step(masked: bool):
    mask = None
    if masked:
      kv_pos = j * bkv + lax.broadcasted_iota(jnp.int32, (bkv, bq), 0)
      q_pos = q_block * bq + lax.broadcasted_iota(jnp.int32, (bkv, bq), 1)
      extra = {}
      if seg:
        extra = dict(q_seg=seg[0][:1, :], kv_seg=widen(seg[1][...], bq))
      mask = masking.visible(q_pos, kv_pos, window=tiling.window,
                             kv_len=tiling.padded_kv, **extra)
    dkv_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[:1, :],
             delta_ref[:1, :], dk_acc, dv_acc, scale=tiling.scale, mask=mask)

  full = fwd_lib.tile_is_full(tiling, q_block, j, seg_stats, b)
  run_tile(q_block < hi, full, tiling.needs_mask, step)

  @pl.when((g == tiling.group - 1) & (t == num_steps - 1))
  def _finish():
    dkv_finish(dk_ref, dv_ref, dk_acc, dv_acc, tiling.scale)


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, *, tiling: Tiling, interpret):
  """dq [b, h, t, d] from q, do [b, h, t, d], k, v [b, k, s, d], lse, delta [b, h, t]."""
  batch, num_heads, _, head_dim = q.shape
  (kv_lo, kv_hi), _, seg_stats, max_kv, _ = fwd_lib.tile_ranges(tiling, batch, q_seg, kv_seg)
  nq, bq, bkv, group = tiling.num_q_blocks, tiling.block_q, tiling.block_kv, tiling.group

  def q_map(b, h, i, j, *_):
    return b, h, i, 0

  def row_map(b, h, i, j, *_):
    return b, h, 0, i

  def kv_block(b, i, j, lo_ref, hi_ref):
    return fwd_lib.clamp_block(lo_ref[b * nq + i], hi_ref[b * nq + i], j)

  def kv_map(b, h, i, j, lo_ref, hi_ref, *_):
    return b, h // group, kv_block(b, i, j, lo_ref, hi_ref), 0

  q_spec = pl.BlockSpec((None, None, bq, head_dim), q_map)
  kv_spec = pl.BlockSpec((None, None, bkv, head_dim), kv_map)
  row_spec = pl.BlockSpec((None, None, SUBLANES, bq), row_map)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  operands = [q, k, v, do, sublane_replicated(lse),
              sublane_replicated(delta)]
  if tiling.has_segments:
    in_specs += [
        pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
        pl.BlockSpec((None, SUBLANES, bkv),
                     lambda b, h, i, j, lo, hi, *_: (b, 0, kv_block(b, i, j, lo, hi)))]
    operands += [lane_replicated(q_seg), sublane_replicated(kv_seg)]
  scratch = [pltpu.VMEM((bq, head_dim), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
             pltpu.VMEM((bq, LANES), jnp.float32)]
  return pl.pallas_call(
      functools.partial(_dq_kernel, tiling=tiling, num_steps=max_kv),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2 + len(seg_stats),
          grid=(batch, num_heads, nq, max_kv),
          in_specs=in_specs, out_specs=q_spec, scratch_shapes=scratch),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=compiler_params(
          ("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="flash_attention_dq",
  )(kv_lo, kv_hi, *seg_stats, *operands)


def backward_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, *, tiling: Tiling, interpret):
  """(dk, dv) [b, k, s, d], summed over each kv head's query heads."""
  batch, num_kv_heads, _, head_dim = k.shape
  _, (q_lo, q_hi), seg_stats, _, max_q = fwd_lib.tile_ranges(tiling, batch, q_seg, kv_seg)
  nk, bq, bkv, group = tiling.num_kv_blocks, tiling.block_q, tiling.block_kv, tiling.group

  def q_block(b, j, t, lo_ref, hi_ref):
    return fwd_lib.clamp_block(lo_ref[b * nk + j], hi_ref[b * nk + j], t)

  def q_map(b, kh, j, g, t, lo_ref, hi_ref, *_):
    return b, kh * group + g, q_block(b, j, t, lo_ref, hi_ref), 0

  def row_map(b, kh, j, g, t, lo_ref, hi_ref, *_):
    return b, kh * group + g, 0, q_block(b, j, t, lo_ref, hi_ref)

  def kv_map(b, kh, j, g, t, *_):
    return b, kh, j, 0

  q_spec = pl.BlockSpec((None, None, bq, head_dim), q_map)
  kv_spec = pl.BlockSpec((None, None, bkv, head_dim), kv_map)
  row_spec = pl.BlockSpec((None, None, SUBLANES, bq), row_map)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  operands = [q, k, v, do, sublane_replicated(lse),
              sublane_replicated(delta)]
  if tiling.has_segments:
    in_specs += [
        pl.BlockSpec((None, SUBLANES, bq),
                     lambda b, kh, j, g, t, lo, hi, *_: (b, 0, q_block(b, j, t, lo, hi))),
        pl.BlockSpec((None, bkv, LANES), lambda b, kh, j, g, t, *_: (b, j, 0))]
    operands += [sublane_replicated(q_seg), lane_replicated(kv_seg)]
  scratch = [pltpu.VMEM((bkv, head_dim), jnp.float32),
             pltpu.VMEM((bkv, head_dim), jnp.float32)]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, tiling=tiling, num_steps=max_q),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2 + len(seg_stats),
          grid=(batch, num_kv_heads, nk, group, max_q),
          in_specs=in_specs, out_specs=[kv_spec, kv_spec], scratch_shapes=scratch),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=compiler_params(
          ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="flash_attention_dkv",
  )(q_lo, q_hi, *seg_stats, *operands)
  return dk, dv
