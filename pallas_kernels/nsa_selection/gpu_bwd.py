"""Mosaic GPU (Hopper) selected-block attention backward: a dq kernel and a dk/dv kernel.

Legend: layers/__init__.py; r = ROWS = 64 query rows per tile (a group's g
heads, zero-padded; see gpu.py). The probabilities are recomputed from the
forward's log2-unit log-sum-exp: p = exp2(s - lse), ds = p (dp - delta),
dq = scale ds k, dk = scale ds^T q, dv = p^T do. Padded rows have q = do = 0,
so they add nothing.

dq: one CTA per (query i, kv head c, batch), like the forward: it walks the ns
slots of its block table row, streaming each slot's key and value block
through a two-slot TMA ring.

dk/dv: scatter-free and balanced. An XLA prologue (`work_items`) sorts the
active (block, query) pairs of each (batch, kv head) by block and cuts every
block's run of pairs into chunks of at most `pairs_per_cta`, so a block that
every query selects (the first block, the local ones) is shared by many CTAs
instead of serializing on one. One CTA per (chunk, kv head, batch) holds its
block's keys and values [B, d] in SMEM, streams the chunk's query rows (q, do,
lse, delta) through a two-slot ring and writes a partial dk, dv [B, d]; XLA
sums the partials of each block (float32) afterwards. The tiles are
transposed (kv rows, query columns), so B must be a multiple of 64 (the wgmma
M tile).
"""

import dataclasses
import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.common.gpu import LOG2E, Ops, bcast, smem
from pallas_kernels.nsa_selection.gpu import ROWS, pad_rows, unpad_rows, visible


PAIRS_PER_CTA = 256  # Most (block, query) pairs one dk/dv CTA walks.


@dataclasses.dataclass(frozen=True)
class Shape:
  """Static data of one backward call.

  Attributes:
    block: B; kv_len: s (keys at or past it are padding); num_blocks: nb.
    top_n: ns; scale: logit scale (natural units); has_segments.
  """
  block: int
  kv_len: int
  num_blocks: int
  top_n: int
  scale: float
  has_segments: bool


def _dq_kernel(*refs, shape: Shape, ops: Ops):
  seg = shape.has_segments
  n_in = 8 + (2 if seg else 0)
  ins, dq_ref, scratch = refs[:n_in], refs[n_in], refs[n_in + 1:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, blk_ref, act_ref = ins[:8]
  q_seg_ref, kv_seg_ref = ins[8:] if seg else (None, None)
  (q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring, in_bars, k_ready, v_ready,
   *seg_scratch) = scratch
  i, c, b = lax.axis_index("q"), lax.axis_index("kv_heads"), lax.axis_index("batch")
  bk = shape.block
  rows = pl.ds(c * ROWS, ROWS)
  loads = [(q_ref.at[b, i, rows], q_smem), (do_ref.at[b, i, rows], do_smem),
           (lse_ref.at[b, i, rows], lse_smem), (delta_ref.at[b, i, rows], delta_smem)]
  for n, (src, dst) in enumerate(loads):
    plgpu.copy_gmem_to_smem(src, dst, in_bars.at[n])

  def fetch(j):
    """Starts the TMA copies of slot j's key, value (and id) block into ring slot j % 2."""
    keys, slot = pl.ds(blk_ref[b, c, i, j] * bk, bk), lax.rem(j, 2)
    plgpu.copy_gmem_to_smem(k_ref.at[b, keys, c], k_ring.at[slot], k_ready.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, keys, c], v_ring.at[slot], v_ready.at[slot])
    if seg:
      plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, keys], seg_scratch[0].at[slot],
                              seg_scratch[1].at[slot])

  fetch(jnp.int32(0))
  for n in range(len(loads)):
    plgpu.barrier_wait(in_bars.at[n])
  lse = ops.load_vector(lse_smem, axis=1)
  delta = ops.load_vector(delta_smem, axis=1)
  q_id = q_seg_ref[b, i] if seg else None

  def step(j, dq):
    slot = lax.rem(j, 2)
    # Slot (j + 1) % 2 was last read by step j - 1, whose wgmmas have completed.
    pl.when(j + 1 < shape.top_n)(lambda: fetch(j + 1))
    kv_pos = blk_ref[b, c, i, j] * bk + ops.iota((ROWS, bk), 1)
    seen = visible(kv_pos, i, shape.kv_len, act_ref[b, c, i, j] != 0)
    plgpu.barrier_wait(k_ready.at[slot])
    s = ops.matmul_nt(q_smem, k_ring.at[slot], (ROWS, bk)) * (shape.scale * LOG2E)
    if seg:
      plgpu.barrier_wait(seg_scratch[1].at[slot])
      kv_ids = ops.load_vector(seg_scratch[0].at[slot], axis=0)
      seen = seen & (bcast(kv_ids, s.shape, 1) == q_id)
    p = jnp.where(seen, jnp.exp2(s - bcast(lse, s.shape, 0)), 0.0)
    plgpu.barrier_wait(v_ready.at[slot])
    dp = ops.matmul_nt(do_smem, v_ring.at[slot], (ROWS, bk))
    ds = p * (dp - bcast(delta, dp.shape, 0))
    return ops.matmul_acc(dq, ds.astype(k_ring.dtype), k_ring.at[slot])

  dq = lax.fori_loop(0, shape.top_n, step, ops.full((ROWS, q_smem.shape[-1]), 0.0))
  q_smem[...] = (dq * shape.scale).astype(q_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, i, rows])
  plgpu.wait_smem_to_gmem(0)


def backward_dq(q, k, v, do, lse, delta, blk, act, q_seg, kv_seg, *, shape: Shape, interpret):
  """dq [b, t, h, d].

  Args:
    q, do: [b, t, h, d]; k, v: [b, nb·B, k, d] (zero-padded).
    lse: [b, t, k * r] float32 from gpu.forward.
    delta: [b, t, h] float32, sum(out * do) over d.
    blk, act: int32 [b, k, t, ns] block table (api.block_table).
    q_seg, kv_seg: int32 [b, t], [b, nb·B] or None.
    interpret: False, or the Mosaic GPU interpreter's params.
  """
  b, t, h, d = q.shape
  num_kv, bk, dtype = k.shape[2], shape.block, q.dtype
  scratch = [smem((ROWS, d), dtype, True), smem((ROWS, d), dtype, True),
             smem((ROWS,), jnp.float32), smem((ROWS,), jnp.float32),
             smem((2, bk, d), dtype, True), smem((2, bk, d), dtype, True),
             plgpu.Barrier(num_barriers=4), plgpu.Barrier(num_barriers=2),
             plgpu.Barrier(num_barriers=2)]
  operands = [pad_rows(q, num_kv), k, v, pad_rows(do, num_kv), lse,
              pad_rows(delta, num_kv), blk, act]
  if shape.has_segments:
    scratch += [smem((2, bk), jnp.int32), plgpu.Barrier(num_barriers=2)]
    operands += [q_seg, kv_seg]
  dq = plgpu.kernel(
      functools.partial(_dq_kernel, shape=shape, ops=Ops(interpret=bool(interpret))),
      out_type=jax.ShapeDtypeStruct((b, t, num_kv * ROWS, d), dtype),
      scratch_types=scratch,
      grid=(t, num_kv, b),
      grid_names=("q", "kv_heads", "batch"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret or None,
  )(*operands)
  return unpad_rows(dq, num_kv, h // num_kv)


def work_items(blk, act, *, num_blocks: int, pairs_per_cta: int):
  """The dk/dv kernel's work list, built in XLA from the block table.

  Args:
    blk, act: int32 [b, k, t, ns] block table.
    num_blocks: nb; pairs_per_cta: the most pairs one CTA walks.

  Returns:
    pair_q: int32 [b, k, t * ns], query position of each pair, sorted by block
      (inactive slots last).
    item_block, item_lo, item_hi: int32 [b, k, items] with
      items = nb + ceil(t * ns / pairs_per_cta): CTA w walks pairs [lo, hi) of
      block item_block; unused items have block nb and lo = hi.
  """
  b, num_kv, t, n = blk.shape
  pairs = t * n
  key = jnp.where(act != 0, blk, num_blocks).reshape(b, num_kv, pairs)
  order = jnp.argsort(key, axis=-1, stable=True)
  pair_q = (order // n).astype(jnp.int32)
  sorted_key = jnp.take_along_axis(key, order, axis=-1)
  bounds = jnp.arange(num_blocks + 1, dtype=jnp.int32)
  starts = jax.vmap(jax.vmap(lambda x: jnp.searchsorted(x, bounds)))(sorted_key)
  starts = starts.astype(jnp.int32)  # [b, k, nb + 1]: block m's pairs are [starts[m], starts[m+1]).
  counts = starts[..., 1:] - starts[..., :-1]
  chunks = -(-counts // pairs_per_cta)  # [b, k, nb]
  first_item = jnp.cumsum(chunks, axis=-1) - chunks
  num_items = num_blocks + -(-pairs // pairs_per_cta)
  w = jnp.arange(num_items, dtype=jnp.int32)
  total = jnp.sum(chunks, axis=-1, keepdims=True)
  block = jax.vmap(jax.vmap(
      lambda ends: jnp.searchsorted(ends, w, side="right")))(first_item + chunks)
  block = jnp.where(w < total, block, num_blocks).astype(jnp.int32)
  safe = jnp.minimum(block, num_blocks - 1)
  chunk = w - jnp.take_along_axis(first_item, safe, axis=-1)
  lo = jnp.take_along_axis(starts, safe, axis=-1) + chunk * pairs_per_cta
  hi = jnp.minimum(lo + pairs_per_cta, jnp.take_along_axis(starts, safe + 1, axis=-1))
  used = block < num_blocks
  return pair_q, block, jnp.where(used, lo, 0), jnp.where(used, hi, 0)


def _dkv_kernel(*refs, shape: Shape, ops: Ops):
  seg = shape.has_segments
  n_in = 10 + (2 if seg else 0)
  ins, (dk_ref, dv_ref), scratch = refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pair_q, item_block, item_lo,
   item_hi) = ins[:10]
  q_seg_ref, kv_seg_ref = ins[10:] if seg else (None, None)
  (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bars, q_ready, do_ready,
   lse_ready, delta_ready, *seg_scratch) = scratch
  w, c, b = lax.axis_index("items"), lax.axis_index("kv_heads"), lax.axis_index("batch")
  bk = shape.block
  # Unused items (block nb) read the last block and write a partial nobody sums.
  block = jnp.minimum(item_block[b, c, w], shape.num_blocks - 1)
  lo, num_steps = item_lo[b, c, w], item_hi[b, c, w] - item_lo[b, c, w]
  keys = pl.ds(block * bk, bk)
  loads = [(k_ref.at[b, keys, c], k_smem), (v_ref.at[b, keys, c], v_smem)]
  if seg:
    loads.append((kv_seg_ref.at[b, keys], seg_scratch[0]))
  for n, (src, dst) in enumerate(loads):
    plgpu.copy_gmem_to_smem(src, dst, kv_bars.at[n])
  rows = pl.ds(c * ROWS, ROWS)

  def fetch(j):
    """Starts the TMA copies of pair lo + j's query rows into ring slot j % 2."""
    qi, slot = pair_q[b, c, lo + j], lax.rem(j, 2)
    for src, ring, ready in ((q_ref, q_ring, q_ready), (do_ref, do_ring, do_ready),
                             (lse_ref, lse_ring, lse_ready),
                             (delta_ref, delta_ring, delta_ready)):
      plgpu.copy_gmem_to_smem(src.at[b, qi, rows], ring.at[slot], ready.at[slot])

  pl.when(num_steps > 0)(lambda: fetch(jnp.int32(0)))
  for n in range(len(loads)):
    plgpu.barrier_wait(kv_bars.at[n])
  kv_ids = ops.load_vector(seg_scratch[0], axis=1) if seg else None

  def step(j, carry):
    dk, dv = carry
    qi, slot = pair_q[b, c, lo + j], lax.rem(j, 2)
    pl.when(j + 1 < num_steps)(lambda: fetch(j + 1))
    kv_pos = block * bk + ops.iota((bk, ROWS), 0)
    seen = visible(kv_pos, qi, shape.kv_len)
    if seg:
      seen = seen & (bcast(kv_ids, seen.shape, 0) == q_seg_ref[b, qi])
    plgpu.barrier_wait(q_ready.at[slot])
    s_t = ops.matmul_nt(k_smem, q_ring.at[slot], (bk, ROWS)) * (shape.scale * LOG2E)
    plgpu.barrier_wait(lse_ready.at[slot])
    lse = ops.load_vector(lse_ring.at[slot], axis=0)
    p_t = jnp.where(seen, jnp.exp2(s_t - bcast(lse, s_t.shape, 1)), 0.0)
    plgpu.barrier_wait(do_ready.at[slot])
    dv = ops.matmul_acc(dv, p_t.astype(do_ring.dtype), do_ring.at[slot])
    dp_t = ops.matmul_nt(v_smem, do_ring.at[slot], (bk, ROWS))
    plgpu.barrier_wait(delta_ready.at[slot])
    delta = ops.load_vector(delta_ring.at[slot], axis=0)
    ds_t = p_t * (dp_t - bcast(delta, dp_t.shape, 1))
    dk = ops.matmul_acc(dk, ds_t.astype(q_ring.dtype), q_ring.at[slot])
    return dk, dv

  zeros = ops.full((bk, k_smem.shape[-1]), 0.0)
  dk, dv = lax.fori_loop(0, num_steps, step, (zeros, zeros))
  k_smem[...] = (dk * shape.scale).astype(k_smem.dtype)
  v_smem[...] = dv.astype(v_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, c, w])
  plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, c, w])
  plgpu.wait_smem_to_gmem(0)


def backward_dkv(q, k, v, do, lse, delta, blk, act, q_seg, kv_seg, *, shape: Shape,
                 interpret, pairs_per_cta: int | None = None):
  """(dk, dv) [b, nb·B, k, d], summed over the group's heads and every query.

  Arguments as in `backward_dq`; pairs_per_cta bounds one CTA's work
  (default PAIRS_PER_CTA).
  """
  pairs_per_cta = pairs_per_cta or PAIRS_PER_CTA
  b, t, h, d = q.shape
  num_kv = k.shape[2]
  bk, nb, dtype = shape.block, shape.num_blocks, k.dtype
  pair_q, item_block, item_lo, item_hi = work_items(blk, act, num_blocks=nb,
                                                    pairs_per_cta=pairs_per_cta)
  num_items = item_block.shape[-1]
  scratch = [smem((bk, d), dtype, True), smem((bk, d), dtype, True),
             smem((2, ROWS, d), dtype, True), smem((2, ROWS, d), dtype, True),
             smem((2, ROWS), jnp.float32), smem((2, ROWS), jnp.float32),
             plgpu.Barrier(num_barriers=3 if shape.has_segments else 2)]
  scratch += [plgpu.Barrier(num_barriers=2) for _ in range(4)]
  operands = [pad_rows(q, num_kv), k, v, pad_rows(do, num_kv), lse, pad_rows(delta, num_kv),
              pair_q, item_block, item_lo, item_hi]
  if shape.has_segments:
    scratch.append(smem((bk,), jnp.int32))
    operands += [q_seg, kv_seg]
  partial = jax.ShapeDtypeStruct((b, num_kv, num_items, bk, d), dtype)
  dk_part, dv_part = plgpu.kernel(
      functools.partial(_dkv_kernel, shape=shape, ops=Ops(interpret=bool(interpret))),
      out_type=[partial, partial],
      scratch_types=scratch,
      grid=(num_items, num_kv, b),
      grid_names=("items", "kv_heads", "batch"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret or None,
  )(*operands)
  return _sum_partials(dk_part, item_block, nb), _sum_partials(dv_part, item_block, nb)


def _sum_partials(part, item_block, num_blocks: int):
  """[b, k, items, B, d] per-item partials -> [b, nb·B, k, d]: summed per block in float32."""
  b, num_kv, num_items, bk, d = part.shape
  # One segment per (batch, kv head, block); unused items (block nb) get their own.
  rows = jnp.arange(b * num_kv, dtype=jnp.int32).reshape(b, num_kv, 1)
  ids = (rows * (num_blocks + 1) + item_block).reshape(-1)
  total = jax.ops.segment_sum(part.astype(jnp.float32).reshape(-1, bk, d), ids,
                              num_segments=b * num_kv * (num_blocks + 1))
  total = total.reshape(b, num_kv, num_blocks + 1, bk, d)[:, :, :num_blocks]
  total = total.reshape(b, num_kv, num_blocks * bk, d).transpose(0, 2, 1, 3)
  return total.astype(part.dtype)
