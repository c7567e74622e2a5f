"""Mosaic GPU (Hopper) attention backward CTAs over tile sources: dq and dk/dv.

Same scheme as the forward (gpu_cta): each CTA has `wgs` compute warpgroups
owning block rows, and a memory warpgroup streaming the other operand's blocks
through a TMA ring. Probabilities are recomputed from the forward's log2-unit
log-sum-exp: p = exp2(s - lse), ds = p (dp - delta), dq = scale ds k,
dk = scale ds^T q, dv = p^T do.

dq: CTA = wgs * block_q query rows of one q head; streams k, v; takes the
forward's tile sources. dk/dv: CTA = wgs * block_kv key rows of one kv head;
streams q, do, lse, delta of every query head in the GQA group, so dk and dv
come out summed over the group. Its tiles are transposed (kv rows, q columns)
and its sources walk (query head, query block) pairs:
flash_attention.gpu_bwd.RangeQTiles or block_sparse.gpu_bwd.MapQTiles.
"""

import dataclasses

from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.common.gpu import LOG2E, Ops, Stream, bcast, produce_ring, slot_of, smem
from pallas_kernels.common.gpu_cta import step_scores, stream_kv_tiles


@dataclasses.dataclass(frozen=True)
class DqScratch:
  """SMEM buffers and barriers of a dq CTA (the *_ids ones only with segment ids)."""
  q_smem: object
  do_smem: object
  lse_smem: object
  delta_smem: object
  k_ring: object
  v_ring: object
  q_bars: object
  k_ready: object
  v_ready: object
  k_consumed: object
  v_consumed: object
  q_ids_smem: object = None
  kv_ids_ring: object = None
  kv_ids_ready: object = None


def dq_cta(tiles_of, refs, scratch: DqScratch, *, scale: float, group: int, slots: int,
           wgs: int, ops: Ops):
  """One dq CTA: `wgs` compute warpgroups of query rows and a memory warpgroup.

  tiles_of(batch, head, cta) -> the CTA's kv tiles, a tile source as in
  gpu_cta.forward_cta (flash_attention.gpu.RangeTiles or
  block_sparse.gpu.MapTiles).
  refs: (q, k, v, do, lse, delta, q_seg or None, kv_seg or None, dq) GMEM refs.
  """
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref = refs
  seg, sc = q_seg_ref is not None, scratch
  bq, bkv = sc.q_smem.shape[1], sc.k_ring.shape[1]
  b, h = lax.axis_index("batch"), lax.axis_index("heads")
  cta, wg = lax.axis_index("q_tiles"), lax.axis_index("wg")
  source = tiles_of(b, h, cta)

  @pl.when(wg < wgs)
  def _compute():
    ops.set_registers(compute=True)
    q_block = cta * wgs + wg
    row0 = q_block * bq
    rows = pl.ds(row0, bq)
    loads = [(q_ref.at[b, rows, h], sc.q_smem), (do_ref.at[b, rows, h], sc.do_smem),
             (lse_ref.at[b, h, rows], sc.lse_smem), (delta_ref.at[b, h, rows], sc.delta_smem)]
    if seg:
      loads.append((q_seg_ref.at[b, rows], sc.q_ids_smem))
    load_rows(loads, sc.q_bars, wg, wgs)
    lse = ops.load_vector(sc.lse_smem.at[wg], axis=1)
    delta = ops.load_vector(sc.delta_smem.at[wg], axis=1)
    q_ids = ops.load_vector(sc.q_ids_smem.at[wg], axis=1) if seg else None

    def step(t, dq_acc):
      slot, s = step_scores(source, sc, t, wg=wg, q_block=q_block, row0=row0, q_ids=q_ids,
                            scale=scale, slots=slots, ops=ops)
      p = jnp.exp2(s - bcast(lse, s.shape, 0))
      plgpu.barrier_wait(sc.v_ready.at[slot])
      dp = ops.matmul_nt(sc.do_smem.at[wg], sc.v_ring.at[slot], (bq, bkv))
      plgpu.barrier_arrive(sc.v_consumed.at[slot])
      ds = p * (dp - bcast(delta, dp.shape, 0))
      dq_acc = ops.matmul_acc(dq_acc, ds.astype(sc.k_ring.dtype), sc.k_ring.at[slot])
      plgpu.barrier_arrive(sc.k_consumed.at[slot])
      return dq_acc

    dq = lax.fori_loop(0, source.num_steps, step, ops.full((bq, sc.q_smem.shape[-1]), 0.0))
    sc.q_smem.at[wg][...] = (dq * scale).astype(sc.q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(sc.q_smem.at[wg], dq_ref.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == wgs)
  def _memory():
    ops.set_registers(compute=False)
    stream_kv_tiles(source, (k_ref, v_ref, kv_seg_ref), sc, batch=b, head=h, group=group,
                    slots=slots, wgs=wgs)


def load_rows(loads, bars, wg, wgs: int):
  """Copies each (GMEM src, SMEM dst) pair into dst.at[wg] and waits for all of them."""
  for n, (src, dst) in enumerate(loads):
    plgpu.copy_gmem_to_smem(src, dst.at[wg], bars.at[n * wgs + wg])
  for n in range(len(loads)):
    plgpu.barrier_wait(bars.at[n * wgs + wg])


@dataclasses.dataclass(frozen=True)
class DkvScratch:
  """SMEM buffers and barriers of a dk/dv CTA (the *_ids ones only with segment ids)."""
  k_smem: object
  v_smem: object
  q_ring: object
  do_ring: object
  lse_ring: object
  delta_ring: object
  kv_bars: object
  q_ready: object
  do_ready: object
  lse_ready: object
  delta_ready: object
  q_consumed: object
  do_consumed: object
  kv_ids_smem: object = None
  q_ids_ring: object = None
  q_ids_ready: object = None


def dkv_cta(tiles_of, refs, scratch: DkvScratch, *, scale: float, slots: int, wgs: int,
            ops: Ops):
  """One dk/dv CTA: `wgs` compute warpgroups of key rows and a memory warpgroup.

  tiles_of(batch, kv_head, cta) -> the CTA's (query head, query block) tiles
  (flash_attention.gpu_bwd.RangeQTiles or block_sparse.gpu_bwd.MapQTiles).
  refs: (q, k, v, do, lse, delta, q_seg or None, kv_seg or None, dk, dv) GMEM refs.
  """
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dk_ref,
   dv_ref) = refs
  seg, sc = q_seg_ref is not None, scratch
  bkv, bq = sc.k_smem.shape[1], sc.q_ring.shape[1]
  b, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
  cta, wg = lax.axis_index("kv_tiles"), lax.axis_index("wg")
  source = tiles_of(b, kv_head, cta)

  @pl.when(wg < wgs)
  def _compute():
    ops.set_registers(compute=True)
    kv_block = cta * wgs + wg
    row0 = kv_block * bkv
    rows = pl.ds(row0, bkv)
    loads = [(k_ref.at[b, rows, kv_head], sc.k_smem), (v_ref.at[b, rows, kv_head], sc.v_smem)]
    if seg:
      loads.append((kv_seg_ref.at[b, rows], sc.kv_ids_smem))
    load_rows(loads, sc.kv_bars, wg, wgs)
    kv_ids = ops.load_vector(sc.kv_ids_smem.at[wg], axis=1) if seg else None

    def step(t, carry):
      dk_acc, dv_acc = carry
      q_block, slot = source.q_block(t), slot_of(t, slots)
      plgpu.barrier_wait(sc.q_ready.at[slot])
      s_t = ops.matmul_nt(sc.k_smem.at[wg], sc.q_ring.at[slot], (bkv, bq)) * (scale * LOG2E)
      plgpu.barrier_wait(sc.lse_ready.at[slot])
      lse = ops.load_vector(sc.lse_ring.at[slot], axis=0)
      if source.needs_mask:
        q_ids = None
        if seg:
          plgpu.barrier_wait(sc.q_ids_ready.at[slot])
          q_ids = ops.load_vector(sc.q_ids_ring.at[slot], axis=0)
        s_t = source.mask(s_t, t=t, slot=slot, wg=wg, kv_block=kv_block, kv_pos0=row0,
                          q_block=q_block, q_ids=q_ids, kv_ids=kv_ids)
      p_t = jnp.exp2(s_t - bcast(lse, s_t.shape, 1))
      plgpu.barrier_wait(sc.do_ready.at[slot])
      dv_acc = ops.matmul_acc(dv_acc, p_t.astype(sc.do_ring.dtype), sc.do_ring.at[slot])
      dp_t = ops.matmul_nt(sc.v_smem.at[wg], sc.do_ring.at[slot], (bkv, bq))
      plgpu.barrier_wait(sc.delta_ready.at[slot])
      delta = ops.load_vector(sc.delta_ring.at[slot], axis=0)
      plgpu.barrier_arrive(sc.do_consumed.at[slot])
      ds_t = p_t * (dp_t - bcast(delta, dp_t.shape, 1))
      dk_acc = ops.matmul_acc(dk_acc, ds_t.astype(sc.q_ring.dtype), sc.q_ring.at[slot])
      plgpu.barrier_arrive(sc.q_consumed.at[slot])
      return dk_acc, dv_acc

    zeros = ops.full((bkv, sc.k_smem.shape[-1]), 0.0)
    dk, dv = lax.fori_loop(0, source.num_steps, step, (zeros, zeros))
    sc.k_smem.at[wg][...] = (dk * scale).astype(sc.k_smem.dtype)
    sc.v_smem.at[wg][...] = dv.astype(sc.v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(sc.k_smem.at[wg], dk_ref.at[b, rows, kv_head])
    plgpu.copy_smem_to_gmem(sc.v_smem.at[wg], dv_ref.at[b, rows, kv_head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == wgs)
  def _memory():
    ops.set_registers(compute=False)
    rows = lambda t: pl.ds(source.q_block(t) * bq, bq)
    streams = [Stream(lambda t: q_ref.at[b, rows(t), source.q_head(t)], sc.q_ring,
                      sc.q_ready, sc.q_consumed)]
    streams += source.extra_streams(wgs)
    streams.append(Stream(lambda t: lse_ref.at[b, source.q_head(t), rows(t)], sc.lse_ring,
                          sc.lse_ready))
    if seg:
      streams.append(Stream(lambda t: q_seg_ref.at[b, rows(t)], sc.q_ids_ring,
                            sc.q_ids_ready))
    streams += [Stream(lambda t: do_ref.at[b, rows(t), source.q_head(t)], sc.do_ring,
                       sc.do_ready, sc.do_consumed),
                Stream(lambda t: delta_ref.at[b, source.q_head(t), rows(t)], sc.delta_ring,
                       sc.delta_ready)]
    produce_ring(streams, source.num_steps, slots)


def dq_scratch_types(*, wgs: int, bq: int, bkv: int, head_dim: int, slots: int, dtype,
                     seg: bool):
  """(DqScratch's buffers and barriers, its segment-id ones or []) as scratch types."""
  base = [smem((wgs, bq, head_dim), dtype, True), smem((wgs, bq, head_dim), dtype, True),
          smem((wgs, bq), jnp.float32), smem((wgs, bq), jnp.float32),
          smem((slots, bkv, head_dim), dtype, True), smem((slots, bkv, head_dim), dtype, True),
          plgpu.Barrier(num_barriers=(5 if seg else 4) * wgs),
          plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
          plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),
          plgpu.Barrier(num_arrivals=wgs, num_barriers=slots)]
  ids = [smem((wgs, bq), jnp.int32), smem((slots, bkv), jnp.int32),
         plgpu.Barrier(num_barriers=slots)] if seg else []
  return base, ids


def dkv_scratch_types(*, wgs: int, bq: int, bkv: int, head_dim: int, slots: int, dtype,
                      seg: bool):
  """(DkvScratch's buffers and barriers, its segment-id ones or []) as scratch types."""
  base = [smem((wgs, bkv, head_dim), dtype, True), smem((wgs, bkv, head_dim), dtype, True),
          smem((slots, bq, head_dim), dtype, True), smem((slots, bq, head_dim), dtype, True),
          smem((slots, bq), jnp.float32), smem((slots, bq), jnp.float32),
          plgpu.Barrier(num_barriers=(3 if seg else 2) * wgs)]
  base += [plgpu.Barrier(num_barriers=slots) for _ in range(4)]
  base += [plgpu.Barrier(num_arrivals=wgs, num_barriers=slots) for _ in range(2)]
  ids = [smem((wgs, bkv), jnp.int32), smem((slots, bq), jnp.int32),
         plgpu.Barrier(num_barriers=slots)] if seg else []
  return base, ids
