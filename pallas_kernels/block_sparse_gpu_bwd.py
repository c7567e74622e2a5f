"""Mosaic GPU (Hopper) block-sparse attention backward: dq and dk/dv kernels.

flash_attention_gpu_bwd's scheme (compute warpgroups owning rows, a memory
warpgroup streaming the other operand through a TMA ring) driven by KernelMaps:
dq streams the k/v blocks its query CTA lists; dk/dv streams, per key CTA, the
(query head in group, query block) entries of the transposed map, so dk and dv
come out summed over the GQA group. PARTIAL entries also stream their element
mask (block_sparse_gpu.mask_stream); FULL entries do no mask work.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import block_sparse_gpu as sgpu
from pallas_kernels.block_sparse_map import KernelMap
from pallas_kernels.flash_attention_gpu import LOG2E
from pallas_kernels.flash_attention_gpu_ops import (TRANSFORMS, Ops, Stream, bcast,
                                                    produce_ring, slot_of)


def _smem(shape, dtype, tiled=False):
  return plgpu.SMEM(shape, dtype, transforms=TRANSFORMS if tiled else ())


def _dq_kernel(*refs, kmap: KernelMap, group: int, scale: float, slots: int, wgs: int,
               ops: Ops, seg: bool, partial: bool):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, index, mask_id, counts, masks_ref = refs[:10]
  n_in = 10 + (6 if seg else 0)
  q_seg_ref, kv_seg_ref, *stat_refs = refs[10:n_in] if seg else (None, None)
  dq_ref, scratch = refs[n_in], refs[n_in + 1:]
  (q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring, q_bars, k_ready, v_ready,
   k_consumed, v_consumed, mask_ring, mask_ready, *seg_scratch) = scratch
  bq, bkv = q_smem.shape[1], k_ring.shape[1]
  b, h = lax.axis_index("batch"), lax.axis_index("heads")
  cta, wg = lax.axis_index("q_tiles"), lax.axis_index("wg")
  hm = lax.div(h, jnp.int32(kmap.head_div))
  num_steps = counts[hm, cta]
  kv_block_of = lambda t: index[hm, cta, t]
  mask_id_of = lambda t: mask_id[hm, cta, t]

  @pl.when(wg < wgs)
  def _compute():
    ops.set_registers(compute=True)
    q_block = cta * wgs + wg
    rows = pl.ds(q_block * bq, bq)
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
      kv_block, slot = kv_block_of(t), slot_of(t, slots)
      plgpu.barrier_wait(k_ready.at[slot])
      s = ops.matmul_nt(q_smem.at[wg], k_ring.at[slot], (bq, bkv)) * (scale * LOG2E)
      if seg or partial:
        seg_ids = None
        if seg:
          plgpu.barrier_wait(seg_scratch[2].at[slot])
          seg_ids = (q_ids, ops.load_vector(seg_scratch[1].at[slot], axis=0))
        is_partial = mask_id_of(t) >= 0

        def load_tile():
          plgpu.barrier_wait(mask_ready.at[slot])
          return sgpu.unpack_bits(ops, mask_ring.at[slot, wg], (bq, bkv))
        s = sgpu.apply_mask(s, full=sgpu.tile_full(is_partial, stat_refs, b, q_block, kv_block),
                            partial=is_partial, load_tile=load_tile, seg_ids=seg_ids,
                            transposed=False, needs_tile=partial)
      p = jnp.exp2(s - bcast(lse, s.shape, 0))
      plgpu.barrier_wait(v_ready.at[slot])
      dp = ops.matmul_nt(do_smem.at[wg], v_ring.at[slot], (bq, bkv))
      plgpu.barrier_arrive(v_consumed.at[slot])
      ds = p * (dp - bcast(delta, dp.shape, 0))
      dq_acc = ops.matmul_acc(dq_acc, ds.astype(k_ring.dtype), k_ring.at[slot])
      plgpu.barrier_arrive(k_consumed.at[slot])
      return dq_acc

    dq = lax.fori_loop(0, num_steps, step, ops.full((bq, q_smem.shape[-1]), 0.0))
    q_smem.at[wg][...] = (dq * scale).astype(q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == wgs)
  def _memory():
    ops.set_registers(compute=False)
    kv_head = lax.div(h, jnp.int32(group))
    rows = lambda t: pl.ds(kv_block_of(t) * bkv, bkv)
    streams = [Stream(lambda t: k_ref.at[b, rows(t), kv_head], k_ring, k_ready, k_consumed)]
    if partial:
      streams.append(sgpu.mask_stream(masks_ref, mask_ring, mask_ready, mask_id_of))
    if seg:
      streams.append(Stream(lambda t: kv_seg_ref.at[b, rows(t)], seg_scratch[1],
                            seg_scratch[2]))
    streams.append(Stream(lambda t: v_ref.at[b, rows(t), kv_head], v_ring, v_ready,
                          v_consumed))
    produce_ring(streams, num_steps, slots)


def _dkv_kernel(*refs, kmap: KernelMap, group: int, num_q_blocks: int, scale: float,
                slots: int, wgs: int, ops: Ops, seg: bool, partial: bool):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, index, mask_id, counts, masks_ref = refs[:10]
  n_in = 10 + (6 if seg else 0)
  q_seg_ref, kv_seg_ref, *stat_refs = refs[10:n_in] if seg else (None, None)
  (dk_ref, dv_ref), scratch = refs[n_in:n_in + 2], refs[n_in + 2:]
  (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bars, q_ready, do_ready,
   lse_ready, delta_ready, q_consumed, do_consumed, mask_ring, mask_ready,
   *seg_scratch) = scratch
  bkv, bq = k_smem.shape[1], q_ring.shape[1]
  b, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
  cta, wg = lax.axis_index("kv_tiles"), lax.axis_index("wg")
  hm = lax.div(kv_head, jnp.int32(kmap.head_div))
  num_steps = counts[hm, cta]
  entry = lambda t: index[hm, cta, t]
  q_block_of = lambda t: lax.rem(entry(t), jnp.int32(num_q_blocks))
  q_head_of = lambda t: kv_head * group + lax.div(entry(t), jnp.int32(num_q_blocks))
  mask_id_of = lambda t: mask_id[hm, cta, t]

  @pl.when(wg < wgs)
  def _compute():
    ops.set_registers(compute=True)
    kv_block = cta * wgs + wg
    rows = pl.ds(kv_block * bkv, bkv)
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
      s_t = ops.matmul_nt(k_smem.at[wg], q_ring.at[slot], (bkv, bq)) * (scale * LOG2E)
      plgpu.barrier_wait(lse_ready.at[slot])
      lse = ops.load_vector(lse_ring.at[slot], axis=0)
      if seg or partial:
        seg_ids = None
        if seg:
          plgpu.barrier_wait(seg_scratch[2].at[slot])
          seg_ids = (ops.load_vector(seg_scratch[1].at[slot], axis=0), kv_ids)
        is_partial = mask_id_of(t) >= 0

        def load_tile():
          plgpu.barrier_wait(mask_ready.at[slot])
          return sgpu.unpack_bits(ops, mask_ring.at[slot, wg], (bkv, bq))
        s_t = sgpu.apply_mask(s_t, full=sgpu.tile_full(is_partial, stat_refs, b, q_block,
                                                       kv_block),
                              partial=is_partial, load_tile=load_tile, seg_ids=seg_ids,
                              transposed=True, needs_tile=partial)
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

    zeros = ops.full((bkv, k_smem.shape[-1]), 0.0)
    dk, dv = lax.fori_loop(0, num_steps, step, (zeros, zeros))
    k_smem.at[wg][...] = (dk * scale).astype(k_smem.dtype)
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
                      q_consumed)]
    if partial:
      streams.append(sgpu.mask_stream(masks_ref, mask_ring, mask_ready, mask_id_of))
    streams.append(Stream(lambda t: lse_ref.at[b, q_head_of(t), rows(t)], lse_ring,
                          lse_ready))
    if seg:
      streams.append(Stream(lambda t: q_seg_ref.at[b, rows(t)], seg_scratch[1],
                            seg_scratch[2]))
    streams += [Stream(lambda t: do_ref.at[b, rows(t), q_head_of(t)], do_ring, do_ready,
                       do_consumed),
                Stream(lambda t: delta_ref.at[b, q_head_of(t), rows(t)], delta_ring,
                       delta_ready)]
    produce_ring(streams, num_steps, slots)


def _kernel_call(body, *, out_type, scratch, grid, grid_names, wgs, interpret, operands):
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
      num_threads=wgs + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret or None,
  )(*operands)


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, *, kmap: KernelMap, scale: float,
                slots: int, wgs: int, interpret):
  """dq [b, tq, h, d] over the dq map's tiles (CTA: wgs * block_q query rows)."""
  batch, q_len, num_heads, head_dim = q.shape
  rows, bkv, dtype = kmap.block_rows, kmap.block_cols, q.dtype
  bq = rows // wgs
  slots = max(1, min(slots, kmap.max_steps))
  seg, partial = q_seg is not None, sgpu.has_partial(kmap)
  scratch = [_smem((wgs, bq, head_dim), dtype, True), _smem((wgs, bq, head_dim), dtype, True),
             _smem((wgs, bq), jnp.float32), _smem((wgs, bq), jnp.float32),
             _smem((slots, bkv, head_dim), dtype, True),
             _smem((slots, bkv, head_dim), dtype, True),
             plgpu.Barrier(num_barriers=(5 if seg else 4) * wgs),
             plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
             plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),
             plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),
             *sgpu.mask_scratch(partial, slots, wgs, bq, bkv)]
  operands = [q, k, v, do, lse, delta, *sgpu.map_operands(kmap, wgs)]
  if seg:
    scratch += [_smem((wgs, bq), jnp.int32), _smem((slots, bkv), jnp.int32),
                plgpu.Barrier(num_barriers=slots)]
    operands += [q_seg, kv_seg, *sgpu.seg_stats(q_seg, kv_seg, bq, bkv)]
  body = functools.partial(_dq_kernel, kmap=kmap, group=num_heads // k.shape[2], scale=scale,
                           slots=slots, wgs=wgs, ops=Ops(interpret=bool(interpret)), seg=seg,
                           partial=partial)
  return _kernel_call(body, out_type=jax.ShapeDtypeStruct(q.shape, dtype), scratch=scratch,
                      grid=(num_heads, q_len // rows, batch),
                      grid_names=("heads", "q_tiles", "batch"), wgs=wgs, interpret=interpret,
                      operands=operands)


def backward_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, *, kmap: KernelMap, scale: float,
                 slots: int, wgs: int, interpret):
  """(dk, dv) [b, tk, k, d] over the dkv map's tiles (CTA: wgs * block_kv key rows)."""
  batch, kv_len, num_kv_heads, head_dim = k.shape
  rows, bq, dtype = kmap.block_rows, kmap.block_cols, k.dtype
  bkv = rows // wgs
  slots = max(1, min(slots, kmap.max_steps))
  seg, partial = q_seg is not None, sgpu.has_partial(kmap)
  scratch = [_smem((wgs, bkv, head_dim), dtype, True), _smem((wgs, bkv, head_dim), dtype, True),
             _smem((slots, bq, head_dim), dtype, True), _smem((slots, bq, head_dim), dtype, True),
             _smem((slots, bq), jnp.float32), _smem((slots, bq), jnp.float32),
             plgpu.Barrier(num_barriers=(3 if seg else 2) * wgs)]
  scratch += [plgpu.Barrier(num_barriers=slots) for _ in range(4)]
  scratch += [plgpu.Barrier(num_arrivals=wgs, num_barriers=slots) for _ in range(2)]
  scratch += sgpu.mask_scratch(partial, slots, wgs, bkv, bq)
  operands = [q, k, v, do, lse, delta, *sgpu.map_operands(kmap, wgs)]
  if seg:
    scratch += [_smem((wgs, bkv), jnp.int32), _smem((slots, bq), jnp.int32),
                plgpu.Barrier(num_barriers=slots)]
    operands += [q_seg, kv_seg, *sgpu.seg_stats(q_seg, kv_seg, bq, bkv)]
  body = functools.partial(_dkv_kernel, kmap=kmap, group=q.shape[2] // num_kv_heads,
                           num_q_blocks=q.shape[1] // bq, scale=scale, slots=slots, wgs=wgs,
                           ops=Ops(interpret=bool(interpret)), seg=seg, partial=partial)
  dk, dv = _kernel_call(
      body, out_type=[jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)],
      scratch=scratch, grid=(num_kv_heads, kv_len // rows, batch),
      grid_names=("heads", "kv_tiles", "batch"), wgs=wgs, interpret=interpret,
      operands=operands)
  return dk, dv
