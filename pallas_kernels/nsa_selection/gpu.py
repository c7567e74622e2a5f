"""Mosaic GPU (Hopper) selected-block attention forward (NSA's selection branch).

Legend: layers/__init__.py; r = ROWS = 64 query rows per CTA.

Group-centric like the TPU kernel: one CTA (one warpgroup) owns query i of kv
head c and all g heads of that group, padded to r = 64 rows (the wgmma M
tile; the wrapper zero-pads q on the XLA side, so g <= 64). It walks the ns
slots of (b, c, i) from the block table: TMA brings the slot's key and value
blocks [B, d] into a two-slot SMEM ring (slot j + 1 is fetched while slot j
computes), wgmma computes scores and p @ v, and an online softmax (log2
units, exp2; common/gpu_cta.py) accumulates. Inactive slots re-fetch an
already valid block and are masked out whole, so the loop has no branches.

A first GPU version: one warpgroup, no warp specialization. The forward also
stores the rows' log-sum-exp (log2 units) for the backward kernels
(gpu_bwd.py). Operands must be bfloat16 or float16, d a multiple of 64, B a
multiple of 64 (the backward's wgmma M tile) and g <= 64.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.common.gpu import LOG2E, TRANSFORMS, Ops, bcast
from pallas_kernels.common.gpu_cta import softmax_init, softmax_result, softmax_update


ROWS = 64  # wgmma M tile: query rows (heads of the group, zero-padded) per CTA.


def pad_rows(x, num_kv: int):
  """[b, t, h, ...] -> [b, t, k * r, ...]: each group's g heads zero-padded to r = ROWS."""
  b, t, h = x.shape[:3]
  g = h // num_kv
  grouped = x.reshape(b, t, num_kv, g, *x.shape[3:])
  widths = ((0, 0),) * 3 + ((0, ROWS - g),) + ((0, 0),) * (x.ndim - 3)
  return jnp.pad(grouped, widths).reshape(b, t, num_kv * ROWS, *x.shape[3:])


def unpad_rows(x, num_kv: int, g: int):
  """Inverse of pad_rows: [b, t, k * r, ...] -> [b, t, k * g, ...]."""
  b, t = x.shape[:2]
  grouped = x.reshape(b, t, num_kv, ROWS, *x.shape[3:])[:, :, :, :g]
  return grouped.reshape(b, t, num_kv * g, *x.shape[3:])


def visible(kv_pos, q_pos, kv_len: int, active=True):
  """Causal + padding visibility of kv positions for the query at q_pos."""
  return (kv_pos <= q_pos) & (kv_pos < kv_len) & active


def _fwd_kernel(*refs, block: int, kv_len: int, top_n: int, scale: float, has_segments: bool,
                ops: Ops):
  if has_segments:
    (q_ref, k_ref, v_ref, blk_ref, act_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref,
     q_smem, lse_smem, k_ring, v_ring, ids_ring, q_bar, k_ready, v_ready, ids_ready) = refs
  else:
    (q_ref, k_ref, v_ref, blk_ref, act_ref, o_ref, lse_ref,
     q_smem, lse_smem, k_ring, v_ring, q_bar, k_ready, v_ready) = refs
  i, c, b = lax.axis_index("q"), lax.axis_index("kv_heads"), lax.axis_index("batch")
  head_dim = q_ref.shape[-1]
  rows = pl.ds(c * ROWS, ROWS)
  plgpu.copy_gmem_to_smem(q_ref.at[b, i, rows], q_smem, q_bar.at[0])

  def fetch(j):
    """Starts the TMA copies of slot j's key, value (and id) block into ring slot j % 2."""
    keys, slot = pl.ds(blk_ref[b, c, i, j] * block, block), lax.rem(j, 2)
    plgpu.copy_gmem_to_smem(k_ref.at[b, keys, c], k_ring.at[slot], k_ready.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, keys, c], v_ring.at[slot], v_ready.at[slot])
    if has_segments:
      plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, keys], ids_ring.at[slot], ids_ready.at[slot])

  fetch(jnp.int32(0))
  q_id = q_seg_ref[b, i] if has_segments else None
  plgpu.barrier_wait(q_bar.at[0])

  def step(j, carry):
    acc, m, l = carry
    slot = lax.rem(j, 2)
    # Slot (j + 1) % 2 was last read by step j - 1, whose wgmmas have completed.
    pl.when(j + 1 < top_n)(lambda: fetch(j + 1))
    kv_pos = blk_ref[b, c, i, j] * block + ops.iota((ROWS, block), 1)
    seen = visible(kv_pos, i, kv_len, act_ref[b, c, i, j] != 0)
    plgpu.barrier_wait(k_ready.at[slot])
    s = ops.matmul_nt(q_smem, k_ring.at[slot], (ROWS, block)) * (scale * LOG2E)
    if has_segments:
      plgpu.barrier_wait(ids_ready.at[slot])
      kv_ids = ops.load_vector(ids_ring.at[slot], axis=0)
      seen = seen & (bcast(kv_ids, s.shape, 1) == q_id)
    s = jnp.where(seen, s, -jnp.inf)
    p, acc, m_next, l = softmax_update(s, acc, m, l)
    plgpu.barrier_wait(v_ready.at[slot])
    acc = ops.matmul_acc(acc, p.astype(v_ring.dtype), v_ring.at[slot])
    return acc, m_next, l

  acc, m, l = lax.fori_loop(0, top_n, step, softmax_init(ops, ROWS, head_dim))
  out, lse = softmax_result(acc, m, l)
  q_smem[...] = out.astype(q_smem.dtype)
  lse_smem[...] = lse
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, i, rows])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, i, rows])
  plgpu.wait_smem_to_gmem(0)


def forward(q, k, v, blk, act, q_seg, kv_seg, *, block: int, kv_len: int, scale: float,
            interpret):
  """Selected-block attention forward on Hopper.

  Args:
    q: [b, t, h, d]; k, v: [b, nb·B, k, d] (zero-padded); bfloat16 or
      float16, d % 64 == 0.
    blk, act: int32 [b, k, t, ns] block table (api.block_table).
    q_seg, kv_seg: int32 [b, t], [b, nb·B] or None.
    block: B; kv_len: s (keys at or past it are masked); scale: logit scale.
    interpret: False, or the Mosaic GPU interpreter's params.

  Returns:
    out [b, t, h, d] in q.dtype; lse [b, t, k * r] float32, the log2-unit
    log-sum-exp of every (padded) row (gpu_bwd.py reads it).
  """
  b, t, h, d = q.shape
  num_kv, top_n = k.shape[2], blk.shape[3]
  g = h // num_kv
  qp = pad_rows(q, num_kv)
  has_segments = q_seg is not None
  scratch = [plgpu.SMEM((ROWS, d), q.dtype, transforms=TRANSFORMS),
             plgpu.SMEM((ROWS,), jnp.float32),
             plgpu.SMEM((2, block, d), q.dtype, transforms=TRANSFORMS),
             plgpu.SMEM((2, block, d), q.dtype, transforms=TRANSFORMS)]
  if has_segments:
    scratch.append(plgpu.SMEM((2, block), jnp.int32))
  scratch.append(plgpu.Barrier(num_barriers=1))
  scratch += [plgpu.Barrier(num_barriers=2)] * (3 if has_segments else 2)
  operands = [qp, k, v, blk, act] + ([q_seg, kv_seg] if has_segments else [])
  kernel = plgpu.kernel(
      functools.partial(_fwd_kernel, block=block, kv_len=kv_len, top_n=top_n, scale=scale,
                        has_segments=has_segments, ops=Ops(interpret=bool(interpret))),
      out_type=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                jax.ShapeDtypeStruct(qp.shape[:3], jnp.float32)],
      scratch_types=scratch,
      grid=(t, num_kv, b),
      grid_names=("q", "kv_heads", "batch"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret or None,
  )
  out, lse = kernel(*operands)
  return unpad_rows(out, num_kv, g), lse
