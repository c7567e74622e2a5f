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

`dq_cta` takes the forward's tile sources; `dkv_cta` takes sources of (query
head, query block) tiles: `RangeQTiles` here, block_sparse_gpu_bwd.MapQTiles
for block-sparse attention.
"""

import dataclasses
import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.flash_attention_gpu import (LOG2E, RangeTiles, gpu_ranges, mask_unless_full,
                                                step_scores, stream_kv_tiles)
from pallas_kernels.flash_attention_gpu_ops import (Ops, Stream, bcast, produce_ring, slot_of,
                                                    smem, warp_specialized_kernel)
from pallas_kernels.flash_attention_masks import Tiling


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
  flash_attention_gpu.forward_cta (RangeTiles or block_sparse_gpu.MapTiles).
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


def _dq_kernel(*refs, tiling: Tiling, slots: int, wgs: int, ops: Ops):
  seg = tiling.has_segments
  n_in = 8 + (6 if seg else 0)
  ins, dq_ref, scratch = refs[:n_in], refs[n_in], refs[n_in + 1:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kv_lo, kv_hi = ins[:8]
  q_seg_ref, kv_seg_ref, *stat_refs = ins[8:] if seg else (None, None)
  tiles_of = lambda b, h, cta: RangeTiles.of_cta(tiling, ops, kv_lo, kv_hi, stat_refs, b, cta)
  sc = DqScratch(*scratch)
  dq_cta(tiles_of, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                    dq_ref), sc, scale=tiling.scale, group=tiling.group, slots=slots, wgs=wgs,
         ops=ops)


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


@dataclasses.dataclass(frozen=True)
class RangeQTiles:
  """The (query head, query block) tiles of a flash dk/dv CTA, transposed masks.

  Steps walk the q blocks [lo, hi) of each of the kv head's `group` query
  heads. Tile-source protocol of dkv_cta: num_steps, q_block(t), q_head(t),
  needs_mask, mask(...) and extra_streams(...).
  """
  tiling: Tiling
  ops: Ops
  lo: object
  span: object
  num_steps: object
  kv_head: object
  stat_refs: tuple
  batch: object

  @classmethod
  def of_cta(cls, tiling: Tiling, ops: Ops, q_lo, q_hi, stat_refs, batch, kv_head, cta):
    lo, hi = q_lo[batch, cta], q_hi[batch, cta]
    span = jnp.maximum(hi - lo, 1)
    num_steps = (hi - lo) * tiling.group  # (q head in group, q block) pairs.
    return cls(tiling, ops, lo, span, num_steps, kv_head, tuple(stat_refs), batch)

  @property
  def needs_mask(self) -> bool:
    return self.tiling.needs_mask

  def q_block(self, t):
    return self.lo + lax.rem(t, self.span)

  def q_head(self, t):
    return self.kv_head * self.tiling.group + lax.div(t, self.span)

  def mask(self, s_t, *, t, slot, wg, kv_block, kv_pos0, q_block, q_ids, kv_ids):
    """s_t [kv, q] with -inf where not visible; wholly visible tiles skip the work."""
    del t, slot, wg
    return mask_unless_full(s_t, tiling=self.tiling, ops=self.ops, stat_refs=self.stat_refs,
                            batch=self.batch, q_block=q_block, kv_block=kv_block,
                            q_pos0=q_block * self.tiling.block_q, kv_pos0=kv_pos0,
                            q_ids=q_ids, kv_ids=kv_ids, transposed=True)

  def extra_streams(self, wgs: int):
    del wgs
    return []


def dkv_cta(tiles_of, refs, scratch: DkvScratch, *, scale: float, slots: int, wgs: int,
            ops: Ops):
  """One dk/dv CTA: `wgs` compute warpgroups of key rows and a memory warpgroup.

  tiles_of(batch, kv_head, cta) -> the CTA's (query head, query block) tiles
  (RangeQTiles or block_sparse_gpu_bwd.MapQTiles).
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


def _dkv_kernel(*refs, tiling: Tiling, slots: int, wgs: int, ops: Ops):
  seg = tiling.has_segments
  n_in = 8 + (6 if seg else 0)
  ins, (dk_ref, dv_ref), scratch = refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_lo, q_hi = ins[:8]
  q_seg_ref, kv_seg_ref, *stat_refs = ins[8:] if seg else (None, None)
  tiles_of = lambda b, kv_head, cta: RangeQTiles.of_cta(tiling, ops, q_lo, q_hi, stat_refs, b,
                                                        kv_head, cta)
  dkv_cta(tiles_of, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                     dk_ref, dv_ref), DkvScratch(*scratch), scale=tiling.scale, slots=slots,
          wgs=wgs, ops=ops)


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


def backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, *, tiling: Tiling, slots: int,
                wgs: int, interpret):
  """dq [b, tq, h, d] from q, do [b, tq, h, d], k, v [b, tk, k, d], lse, delta [b, h, tq]."""
  batch, q_len, num_heads, head_dim = q.shape
  bq, bkv, dtype = tiling.block_q, tiling.block_kv, q.dtype
  (kv_lo, kv_hi), _, stats = gpu_ranges(tiling, batch, q_seg, kv_seg, q_rows=wgs * bq,
                                        kv_rows=bkv)
  slots = max(1, min(slots, tiling.num_kv_blocks))
  seg = tiling.has_segments
  base, ids = dq_scratch_types(wgs=wgs, bq=bq, bkv=bkv, head_dim=head_dim, slots=slots,
                               dtype=dtype, seg=seg)
  operands = [q, k, v, do, lse, delta, kv_lo, kv_hi]
  if seg:
    operands += [q_seg, kv_seg, *stats]
  return warp_specialized_kernel(
      functools.partial(_dq_kernel, tiling=tiling, slots=slots, wgs=wgs,
                        ops=Ops(interpret=bool(interpret))),
      out_type=jax.ShapeDtypeStruct(q.shape, dtype), scratch=base + ids,
      grid=(num_heads, q_len // (wgs * bq), batch), grid_names=("heads", "q_tiles", "batch"),
      compute_wgs=wgs, interpret=interpret)(*operands)


def backward_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, *, tiling: Tiling, slots: int,
                 wgs: int, interpret):
  """(dk, dv) [b, tk, k, d], summed over each kv head's query heads."""
  batch, kv_len, num_kv_heads, head_dim = k.shape
  bq, bkv, dtype = tiling.block_q, tiling.block_kv, k.dtype
  _, (q_lo, q_hi), stats = gpu_ranges(tiling, batch, q_seg, kv_seg, q_rows=bq,
                                      kv_rows=wgs * bkv)
  seg = tiling.has_segments
  base, ids = dkv_scratch_types(wgs=wgs, bq=bq, bkv=bkv, head_dim=head_dim, slots=slots,
                                dtype=dtype, seg=seg)
  operands = [q, k, v, do, lse, delta, q_lo, q_hi]
  if seg:
    operands += [q_seg, kv_seg, *stats]
  dk, dv = warp_specialized_kernel(
      functools.partial(_dkv_kernel, tiling=tiling, slots=slots, wgs=wgs,
                        ops=Ops(interpret=bool(interpret))),
      out_type=[jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)],
      scratch=base + ids, grid=(num_kv_heads, kv_len // (wgs * bkv), batch),
      grid_names=("heads", "kv_tiles", "batch"), compute_wgs=wgs, interpret=interpret,
  )(*operands)
  return dk, dv
