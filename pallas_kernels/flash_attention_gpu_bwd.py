"""Mosaic GPU (Hopper) flash attention backward: a dq kernel and a dk/dv kernel.

Same scheme as the forward (flash_attention_gpu): each CTA has `compute_wgs`
compute warpgroups owning block rows, and a memory warpgroup streaming the other
operand's blocks through a TMA ring. Probabilities are recomputed from the
forward's log2-unit log-sum-exp: p = exp2(s - lse), ds = p (dp - delta),
dq = scale ds k, dk = scale ds^T q, dv = p^T do.

dq: CTA = compute_wgs * block_q_dq query rows of one q head; streams k, v.
dk/dv: CTA = compute_wgs * block_kv_dkv key rows of one kv head; streams q, do,
lse, delta of every query head in the GQA group, so dk and dv come out summed
over the group. Its tiles are transposed (kv rows, q columns).
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.flash_attention_gpu import LOG2E, gpu_ranges, mask_scores, tile_is_full
from pallas_kernels.flash_attention_gpu_ops import (TRANSFORMS, Ops, Stream, bcast,
                                                    produce_ring, slot_of)
from pallas_kernels.flash_attention_masks import Tiling


def _dq_kernel(*refs, tiling: Tiling, slots: int, wgs: int, ops: Ops):
  seg = tiling.has_segments
  n_in = 8 + (6 if seg else 0)
  ins, (dq_ref,), scratch = refs[:n_in], refs[n_in:n_in + 1], refs[n_in + 1:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kv_lo, kv_hi = ins[:8]
  q_seg_ref, kv_seg_ref, *stat_refs = ins[8:] if seg else (None, None)
  (q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring, q_bars, k_ready, v_ready,
   k_consumed, v_consumed, *seg_scratch) = scratch
  bq, bkv = tiling.block_q, tiling.block_kv
  b, h = lax.axis_index("batch"), lax.axis_index("heads")
  cta, wg = lax.axis_index("q_tiles"), lax.axis_index("wg")
  lo, hi = kv_lo[b, cta], kv_hi[b, cta]
  num_steps = hi - lo

  @pl.when(wg < wgs)
  def _compute():
    ops.set_registers(compute=True)
    q_block = cta * wgs + wg
    row0 = q_block * bq
    rows = pl.ds(row0, bq)
    loads = [(q_ref.at[b, rows, h], q_smem), (do_ref.at[b, rows, h], do_smem),
             (lse_ref.at[b, h, rows], lse_smem), (delta_ref.at[b, h, rows], delta_smem)]
    if seg:
      loads.append((q_seg_ref.at[b, rows], seg_scratch[0]))
    for n, (src, dst) in enumerate(loads):
      plgpu.copy_gmem_to_smem(src, dst.at[wg], q_bars.at[n * wgs + wg])
    for n in range(len(loads)):
      plgpu.barrier_wait(q_bars.at[n * wgs + wg])
    lse = ops.load_vector(lse_smem.at[wg], axis=1)
    delta = ops.load_vector(delta_smem.at[wg], axis=1)
    q_ids = ops.load_vector(seg_scratch[0].at[wg], axis=1) if seg else None

    def step(t, dq_acc):
      kv_block, slot = lo + t, slot_of(t, slots)
      plgpu.barrier_wait(k_ready.at[slot])
      s = ops.matmul_nt(q_smem.at[wg], k_ring.at[slot], (bq, bkv)) * (tiling.scale * LOG2E)
      if tiling.needs_mask:
        kv_ids = None
        if seg:
          plgpu.barrier_wait(seg_scratch[2].at[slot])
          kv_ids = ops.load_vector(seg_scratch[1].at[slot], axis=0)
        masked = functools.partial(mask_scores, tiling=tiling, ops=ops, q_pos0=row0,
                                   kv_pos0=kv_block * bkv, q_ids=q_ids, kv_ids=kv_ids,
                                   transposed=False)
        full = tile_is_full(tiling, q_block, kv_block, stat_refs, b)
        s = lax.cond(full, lambda x: x, masked, s)
      p = jnp.exp2(s - bcast(lse, s.shape, 0))
      plgpu.barrier_wait(v_ready.at[slot])
      dp = ops.matmul_nt(do_smem.at[wg], v_ring.at[slot], (bq, bkv))
      plgpu.barrier_arrive(v_consumed.at[slot])
      ds = p * (dp - bcast(delta, dp.shape, 0))
      dq_acc = ops.matmul_acc(dq_acc, ds.astype(k_ring.dtype), k_ring.at[slot])
      plgpu.barrier_arrive(k_consumed.at[slot])
      return dq_acc

    dq = lax.fori_loop(0, num_steps, step, ops.full((bq, q_smem.shape[-1]), 0.0))
    q_smem.at[wg][...] = (dq * tiling.scale).astype(q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == wgs)
  def _memory():
    ops.set_registers(compute=False)
    kv_head = lax.div(h, jnp.int32(tiling.group))
    rows = lambda t: pl.ds((lo + t) * bkv, bkv)
    streams = [Stream(lambda t: k_ref.at[b, rows(t), kv_head], k_ring, k_ready, k_consumed)]
    if seg:
      streams.append(Stream(lambda t: kv_seg_ref.at[b, rows(t)], seg_scratch[1],
                            seg_scratch[2]))
    streams.append(Stream(lambda t: v_ref.at[b, rows(t), kv_head], v_ring, v_ready,
                          v_consumed))
    produce_ring(streams, num_steps, slots)


def _dkv_kernel(*refs, tiling: Tiling, slots: int, wgs: int, ops: Ops):
  seg = tiling.has_segments
  n_in = 8 + (6 if seg else 0)
  ins, (dk_ref, dv_ref), scratch = refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_lo, q_hi = ins[:8]
  q_seg_ref, kv_seg_ref, *stat_refs = ins[8:] if seg else (None, None)
  (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bars, q_ready, do_ready,
   lse_ready, delta_ready, q_consumed, do_consumed, *seg_scratch) = scratch
  bq, bkv, group = tiling.block_q, tiling.block_kv, tiling.group
  b, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
  cta, wg = lax.axis_index("kv_tiles"), lax.axis_index("wg")
  lo, hi = q_lo[b, cta], q_hi[b, cta]
  span = jnp.maximum(hi - lo, 1)
  num_steps = (hi - lo) * group  # (q head in group, q block) pairs.
  q_block_of = lambda t: lo + lax.rem(t, span)
  q_head_of = lambda t: kv_head * group + lax.div(t, span)

  @pl.when(wg < wgs)
  def _compute():
    ops.set_registers(compute=True)
    kv_block = cta * wgs + wg
    row0 = kv_block * bkv
    rows = pl.ds(row0, bkv)
    loads = [(k_ref.at[b, rows, kv_head], k_smem), (v_ref.at[b, rows, kv_head], v_smem)]
    if seg:
      loads.append((kv_seg_ref.at[b, rows], seg_scratch[0]))
    for n, (src, dst) in enumerate(loads):
      plgpu.copy_gmem_to_smem(src, dst.at[wg], kv_bars.at[n * wgs + wg])
    for n in range(len(loads)):
      plgpu.barrier_wait(kv_bars.at[n * wgs + wg])
    kv_ids = ops.load_vector(seg_scratch[0].at[wg], axis=1) if seg else None

    def step(t, carry):
      dk_acc, dv_acc = carry
      q_block, slot = q_block_of(t), slot_of(t, slots)
      plgpu.barrier_wait(q_ready.at[slot])
      s_t = ops.matmul_nt(k_smem.at[wg], q_ring.at[slot], (bkv, bq)) * (tiling.scale * LOG2E)
      plgpu.barrier_wait(lse_ready.at[slot])
      lse = ops.load_vector(lse_ring.at[slot], axis=0)
      if tiling.needs_mask:
        q_ids = None
        if seg:
          plgpu.barrier_wait(seg_scratch[2].at[slot])
          q_ids = ops.load_vector(seg_scratch[1].at[slot], axis=0)
        masked = functools.partial(mask_scores, tiling=tiling, ops=ops,
                                   q_pos0=q_block * bq, kv_pos0=row0, q_ids=q_ids,
                                   kv_ids=kv_ids, transposed=True)
        full = tile_is_full(tiling, q_block, kv_block, stat_refs, b)
        s_t = lax.cond(full, lambda x: x, masked, s_t)
      p_t = jnp.exp2(s_t - bcast(lse, s_t.shape, 1))
      plgpu.barrier_wait(do_ready.at[slot])
      dv_acc = ops.matmul_acc(dv_acc, p_t.astype(do_ring.dtype), do_ring.at[slot])
      dp_t = ops.matmul_nt(v_smem.at[wg], do_ring.at[slot], (bkv, bq))
      plgpu.barrier_wait(delta_ready.at[slot])
      delta = ops.load_vector(delta_ring.at[slot], axis=0)
      plgpu.barrier_arrive(do_consumed.at[slot])
      ds_t = p_t * (dp_t - bcast(delta, dp_t.shape, 1))
      dk_acc = ops.matmul_acc(dk_acc, ds_t.astype(q_ring.dtype), q_ring.at[slot])
      plgpu.barrier_arrive(q_consumed.at[slot])
      return dk_acc, dv_acc

    head_dim = k_smem.shape[-1]
    zeros = ops.full((bkv, head_dim), 0.0)
    dk, dv = lax.fori_loop(0, num_steps, step, (zeros, zeros))
    k_smem.at[wg][...] = (dk * tiling.scale).astype(k_smem.dtype)
    v_smem.at[wg][...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[b, rows, kv_head])
    plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[b, rows, kv_head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == wgs)
  def _memory():
    ops.set_registers(compute=False)
    rows = lambda t: pl.ds(q_block_of(t) * bq, bq)
    streams = [Stream(lambda t: q_ref.at[b, rows(t), q_head_of(t)], q_ring, q_ready,
                      q_consumed),
               Stream(lambda t: lse_ref.at[b, q_head_of(t), rows(t)], lse_ring, lse_ready)]
    if seg:
      streams.append(Stream(lambda t: q_seg_ref.at[b, rows(t)], seg_scratch[1],
                            seg_scratch[2]))
    streams += [Stream(lambda t: do_ref.at[b, rows(t), q_head_of(t)], do_ring, do_ready,
                       do_consumed),
                Stream(lambda t: delta_ref.at[b, q_head_of(t), rows(t)], delta_ring,
                       delta_ready)]
    produce_ring(streams, num_steps, slots)


def _smem(shape, dtype, tiled=False):
  return plgpu.SMEM(shape, dtype, transforms=TRANSFORMS if tiled else ())


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, *, tiling: Tiling, slots: int,
                wgs: int, interpret):
  """dq [b, tq, h, d] from q, do [b, tq, h, d], k, v [b, tk, k, d], lse, delta [b, h, tq]."""
  batch, q_len, num_heads, head_dim = q.shape
  bq, bkv, dtype = tiling.block_q, tiling.block_kv, q.dtype
  (kv_lo, kv_hi), _, stats = gpu_ranges(tiling, batch, q_seg, kv_seg, q_rows=wgs * bq,
                                        kv_rows=bkv)
  slots = max(1, min(slots, tiling.num_kv_blocks))
  seg = tiling.has_segments
  scratch = [_smem((wgs, bq, head_dim), dtype, True), _smem((wgs, bq, head_dim), dtype, True),
             _smem((wgs, bq), jnp.float32), _smem((wgs, bq), jnp.float32),
             _smem((slots, bkv, head_dim), dtype, True),
             _smem((slots, bkv, head_dim), dtype, True),
             plgpu.Barrier(num_barriers=(5 if seg else 4) * wgs),
             plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
             plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),
             plgpu.Barrier(num_arrivals=wgs, num_barriers=slots)]
  operands = [q, k, v, do, lse, delta, kv_lo, kv_hi]
  if seg:
    scratch += [_smem((wgs, bq), jnp.int32), _smem((slots, bkv), jnp.int32),
                plgpu.Barrier(num_barriers=slots)]
    operands += [q_seg, kv_seg, *stats]
  return plgpu.kernel(
      functools.partial(_dq_kernel, tiling=tiling, slots=slots, wgs=wgs,
                        ops=Ops(interpret=bool(interpret))),
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=scratch,
      grid=(num_heads, q_len // (wgs * bq), batch),
      grid_names=("heads", "q_tiles", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret or None,
  )(*operands)


def backward_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, *, tiling: Tiling, slots: int,
                 wgs: int, interpret):
  """(dk, dv) [b, tk, k, d], summed over each kv head's query heads."""
  batch, kv_len, num_kv_heads, head_dim = k.shape
  bq, bkv, dtype = tiling.block_q, tiling.block_kv, k.dtype
  _, (q_lo, q_hi), stats = gpu_ranges(tiling, batch, q_seg, kv_seg, q_rows=bq,
                                      kv_rows=wgs * bkv)
  seg = tiling.has_segments
  scratch = [_smem((wgs, bkv, head_dim), dtype, True), _smem((wgs, bkv, head_dim), dtype, True),
             _smem((slots, bq, head_dim), dtype, True), _smem((slots, bq, head_dim), dtype, True),
             _smem((slots, bq), jnp.float32), _smem((slots, bq), jnp.float32),
             plgpu.Barrier(num_barriers=(3 if seg else 2) * wgs)]
  scratch += [plgpu.Barrier(num_barriers=slots) for _ in range(4)]
  scratch += [plgpu.Barrier(num_arrivals=wgs, num_barriers=slots) for _ in range(2)]
  operands = [q, k, v, do, lse, delta, q_lo, q_hi]
  if seg:
    scratch += [_smem((wgs, bkv), jnp.int32), _smem((slots, bq), jnp.int32),
                plgpu.Barrier(num_barriers=slots)]
    operands += [q_seg, kv_seg, *stats]
  dk, dv = plgpu.kernel(
      functools.partial(_dkv_kernel, tiling=tiling, slots=slots, wgs=wgs,
                        ops=Ops(interpret=bool(interpret))),
      out_type=[jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)],
      scratch_types=scratch,
      grid=(num_kv_heads, kv_len // (wgs * bkv), batch),
      grid_names=("heads", "kv_tiles", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret or None,
  )(*operands)
  return dk, dv
