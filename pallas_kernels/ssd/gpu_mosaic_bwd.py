"""GPU SSD backward kernel on Mosaic GPU (Hopper), 16-bit inputs: one CTA per (batch, head).

Legend: layers/__init__.py; T = BLOCK = 64, dp / Np padded to multiples of 64
(gpu_mosaic.py, whose layout and per-token rows this kernel shares). The maths
is bwd_step.py's, in the forward's orientation (S [dp, Np]): with the state
gradient G [dp, Np] of the state leaving a block,

    dX = (Mᵀ ∘ B Cᵀ) dY + (w ∘ B) Gᵀ           dC = (dY Xᵀ ∘ M) B + e ∘ (dY S)
    dB = (X dYᵀ ∘ Mᵀ) C + w ∘ (X G)            G_entering = g · G + dYᵀ (e ∘ C)

and the gradient of the in-block cumulative log decay cs per token: the row
sums of (dY Xᵀ ∘ C Bᵀ ∘ M) minus those of its transpose (X dYᵀ ∘ B Cᵀ ∘ Mᵀ,
computed as its own tile: no column reductions), plus e_i · dY_i · (C Sᵀ)_i
and minus w_j · B_j · (X G)_j; the block's last token also gets Σ_j of the
latter and g · Σ (G ∘ S), which this wrapper adds from the kernel's per-block
partial sums.

A compute warpgroup walks the blocks last to first carrying G in registers; a
memory warpgroup streams each block's X, B, C, dY, dYᵀ [dp, T], the entering
state S (saved by the forward for every block, cast to the compute dtype) and
the per-token rows through a TMA ring. The [T, T] weight tiles are wgmma A
operands from registers, and B operands are read in either orientation (MN- or
K-major): that is what 16-bit wgmmas allow and TF32 does not (no transposed
operand, no A in registers), so float32 inputs run the Triton backward
(gpu_bwd.py) after the Mosaic forward; an all-K-major float32 form would need
about twice the shared memory. The residual is the state entering every block
of 64 tokens (4x the xla path's at chunk 256), which spares the backward the
recomputation the Triton kernel does.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.common.gpu import Stream, bcast, kernel_interpret, produce_ring
from pallas_kernels.ssd.gpu_mosaic import (BARRIER_BYTES, BLOCK, ROWS, MosaicOps, block_rows,
                                           pad_last, padded, ring_depth, tiled_smem)

_STREAMS = 7  # x, b, c, dy, dyt, s, rows.


def smem_bytes(head_dim: int, state_size: int, dtype, slots: int) -> int:
  """Shared memory of one backward CTA."""
  dp, np_, t = padded(head_dim), padded(state_size), BLOCK
  item = jnp.dtype(dtype).itemsize
  slot = item * (2 * t * dp + 2 * t * np_ + dp * t + dp * np_) + 4 * ROWS * t
  work = item * (dp * np_ + t * np_)  # G, e∘C in the compute dtype.
  stage = 4 * (t * dp + t * np_ + dp * np_ + 2 * t + dp)
  return slots * slot + work + stage + BARRIER_BYTES


def slots_for(head_dim: int, state_size: int, dtype) -> int:
  """The backward's ring depth (gpu_mosaic.ring_depth); 0 for float32 inputs."""
  if jnp.dtype(dtype).itemsize != 2:
    return 0
  return ring_depth(smem_bytes, head_dim, state_size, dtype)


def _kernel(x_ref, b_ref, c_ref, dy_ref, dyt_ref, s_ref, rows_ref, dsf_ref,
            dx_ref, db_ref, dc_ref, dcs_ref, dw_ref, gs_ref, ds0_ref, *scratch,
            num_blocks: int, group: int, slots: int, ops: MosaicOps):
  (x_ring, b_ring, c_ring, dy_ring, dyt_ring, s_ring, rows_ring, g_smem, ec_smem,
   dx_stage, bc_stage, state_stage, vec_stage, gs_stage, *bars) = scratch
  ready, consumed, dsf_bar = bars[:_STREAMS], bars[_STREAMS], bars[_STREAMS + 1]
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  wg = lax.axis_index("wg")
  dtype = x_ring.dtype
  dp, np_ = g_smem.shape
  f32 = jnp.float32

  @pl.when(wg == 0)
  def _compute():
    ops.set_registers(compute=True)
    plgpu.copy_gmem_to_smem(dsf_ref.at[batch, head], state_stage, dsf_bar.at[0])
    plgpu.barrier_wait(dsf_bar.at[0])
    g0 = state_stage[...]

    def step(k, g):
      i = num_blocks - 1 - k
      slot = lax.rem(k, jnp.int32(slots))
      tokens = pl.ds(i * BLOCK, BLOCK)
      x, b, c = x_ring.at[slot], b_ring.at[slot], c_ring.at[slot]
      dy, dyt, s = dy_ring.at[slot], dyt_ring.at[slot], s_ring.at[slot]
      for name in range(_STREAMS):
        plgpu.barrier_wait(ready[name].at[slot])
      rows = rows_ring.at[slot]
      cs_row, cs_col = ops.load_vector(rows.at[0], 1), ops.load_vector(rows.at[0], 0)
      doc_row, doc_col = ops.load_vector(rows.at[1], 1), ops.load_vector(rows.at[1], 0)
      e_row, w_row = ops.load_vector(rows.at[2], 1), ops.load_vector(rows.at[3], 1)
      gate = rows[4, 0]
      square = (BLOCK, BLOCK)
      r, q = ops.iota(square, 0), ops.iota(square, 1)
      same = bcast(doc_row, square, 0) == bcast(doc_col, square, 1)
      gap = bcast(cs_row, square, 0) - bcast(cs_col, square, 1)  # cs_r - cs_q
      visible, visible_t = (r >= q) & same, (r <= q) & same
      decay = jnp.where(visible, jnp.exp(jnp.where(visible, gap, 0.0)), 0.0)  # [i, j]
      decay_t = jnp.where(visible_t, jnp.exp(jnp.where(visible_t, -gap, 0.0)), 0.0)  # [j, i]
      scores, scores_t = ops.nt(c, b), ops.nt(b, c)  # C Bᵀ [i, j], B Cᵀ [j, i]
      dy_x, x_dy = ops.nt(dy, x), ops.nt(x, dy)  # dY Xᵀ [i, j], X dYᵀ [j, i]
      dcs = ((dy_x * scores * decay).sum(axis=1)
             - (x_dy * scores_t * decay_t).sum(axis=1))
      gs = (g * s[...].astype(f32)).sum(axis=1)  # [dp]: Σ G ∘ S by rows.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # The stages are free.
      g_smem[...] = g.astype(dtype)
      c32 = c[...].astype(f32)
      ec_smem[...] = (c32 * bcast(e_row, c32.shape, 0)).astype(dtype)
      plgpu.commit_smem()
      b32 = b[...].astype(f32)
      wb = (b32 * bcast(w_row, b32.shape, 0)).astype(dtype)
      mm = functools.partial(ops.mm, a_in_registers=True)
      dx = mm((scores_t * decay_t).astype(dtype), dy, transpose_b=False)
      dx = mm(wb, g_smem, transpose_b=True, acc=dx)
      xg = ops.mm(x, g_smem, transpose_b=False)  # X G [T, Np]
      db = mm((x_dy * decay_t).astype(dtype), c, transpose_b=False,
              acc=xg * bcast(w_row, xg.shape, 0))
      dw = (b32 * xg).sum(axis=1) * w_row
      dys = ops.mm(dy, s, transpose_b=False)  # dY S [T, Np]
      dc = mm((dy_x * decay).astype(dtype), b, transpose_b=False,
              acc=dys * bcast(e_row, dys.shape, 0))
      carried = ops.nt(c, s)  # C Sᵀ [T, dp]
      de = (dy[...].astype(f32) * carried).sum(axis=1) * e_row
      g = ops.mm(dyt, ec_smem, transpose_b=False, acc=g * gate)
      plgpu.barrier_arrive(consumed.at[slot])
      dx_stage[...] = dx
      bc_stage[...] = dc
      vec_stage.at[0][...] = dcs + de - dw
      vec_stage.at[1][...] = dw
      gs_stage[...] = gs
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dx_stage, dx_ref.at[batch, tokens, head])
      plgpu.copy_smem_to_gmem(bc_stage, dc_ref.at[batch, tokens, head])
      plgpu.copy_smem_to_gmem(vec_stage.at[0], dcs_ref.at[batch, head, tokens])
      plgpu.copy_smem_to_gmem(vec_stage.at[1], dw_ref.at[batch, head, tokens])
      plgpu.copy_smem_to_gmem(gs_stage, gs_ref.at[batch, head, i])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      bc_stage[...] = db
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(bc_stage, db_ref.at[batch, tokens, head])
      return g

    g = lax.fori_loop(0, num_blocks, step, g0)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    state_stage[...] = g
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(state_stage, ds0_ref.at[batch, head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 1)
  def _memory():
    ops.set_registers(compute=False)
    g = lax.div(head, jnp.int32(group))
    block = lambda k: num_blocks - 1 - k  # noqa: E731
    tokens = lambda k: pl.ds(block(k) * BLOCK, BLOCK)  # noqa: E731
    sources = [lambda k: x_ref.at[batch, tokens(k), head],
               lambda k: b_ref.at[batch, tokens(k), g],
               lambda k: c_ref.at[batch, tokens(k), g],
               lambda k: dy_ref.at[batch, tokens(k), head],
               lambda k: dyt_ref.at[batch, head, :, tokens(k)],
               lambda k: s_ref.at[batch, head, block(k)],
               lambda k: rows_ref.at[batch, head, :, tokens(k)]]
    rings = (x_ring, b_ring, c_ring, dy_ring, dyt_ring, s_ring, rows_ring)
    produce_ring([Stream(src, ring, rdy, consumed if n == 0 else None)
                  for n, (src, ring, rdy) in enumerate(zip(sources, rings, ready))],
                 num_blocks, slots)


def backward(x_dt, cs, doc, keep, to_end, bmat, cmat, states, dy, dfinal, *, interpret):
  """The reverse blocked scan; arguments and results as gpu_bwd.backward's.

  Args:
    x_dt, cs, doc, keep, to_end, bmat, cmat: as gpu_mosaic.forward (16-bit x_dt,
      bmat, cmat; t a multiple of BLOCK).
    states: float32 [b, h, nb, N, d], the state entering every block
      (gpu_mosaic.forward with save_every=1).
    dy: float32 [b, t, h, d]; dfinal: float32 [b, h, N, d].

  Returns:
    float32 dx [b, t, h, d] (of x·dt), db and dc [b, t, h, N] (per head),
    dcs [b, t, h], dinitial [b, h, N, d].
  """
  b, t, h, d = x_dt.shape
  ng, n = bmat.shape[2], bmat.shape[3]
  dp, np_ = padded(d), padded(n)
  dtype = x_dt.dtype
  nb = t // BLOCK
  slots = slots_for(d, n, dtype)
  if not slots:
    raise ValueError(f"The Mosaic GPU SSD backward cannot serve head_dim={d}, state_size={n} "
                     f"in {jnp.dtype(dtype).name}; set config.gpu_kernel='triton'.")
  f32 = jnp.float32
  x = pad_last(x_dt, dp)
  bmat, cmat = pad_last(bmat, np_), pad_last(cmat, np_)
  dy_c = pad_last(dy, dp).astype(dtype)
  dyt = jnp.transpose(dy_c, (0, 2, 3, 1))  # [b, h, dp, t]
  unpadded_t = lambda z: jnp.swapaxes(z, -1, -2)  # noqa: E731
  pad_state = lambda z: jnp.pad(unpadded_t(z), [(0, 0)] * (z.ndim - 2)  # noqa: E731
                                + [(0, dp - d), (0, np_ - n)])
  s = pad_state(states).astype(dtype)  # [b, h, nb, dp, Np]
  rows = block_rows(cs, doc, keep, to_end)
  out_type = [jax.ShapeDtypeStruct((b, t, h, dp), f32),
              jax.ShapeDtypeStruct((b, t, h, np_), f32),
              jax.ShapeDtypeStruct((b, t, h, np_), f32),
              jax.ShapeDtypeStruct((b, h, t), f32), jax.ShapeDtypeStruct((b, h, t), f32),
              jax.ShapeDtypeStruct((b, h, nb, dp), f32),
              jax.ShapeDtypeStruct((b, h, dp, np_), f32)]
  scratch = [tiled_smem((slots, BLOCK, dp), dtype), tiled_smem((slots, BLOCK, np_), dtype),
             tiled_smem((slots, BLOCK, np_), dtype), tiled_smem((slots, BLOCK, dp), dtype),
             tiled_smem((slots, dp, BLOCK), dtype), tiled_smem((slots, dp, np_), dtype),
             plgpu.SMEM((slots, ROWS, BLOCK), f32),
             tiled_smem((dp, np_), dtype), tiled_smem((BLOCK, np_), dtype),
             tiled_smem((BLOCK, dp), f32), tiled_smem((BLOCK, np_), f32),
             tiled_smem((dp, np_), f32),
             plgpu.SMEM((2, BLOCK), f32), plgpu.SMEM((dp,), f32),
             *[plgpu.Barrier(num_barriers=slots) for _ in range(_STREAMS)],
             plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=1)]
  ops = MosaicOps(interpret=bool(interpret))
  body = functools.partial(_kernel, num_blocks=nb, group=h // ng, slots=slots, ops=ops)
  dx, db, dc, dcs, dw, gs, ds0 = plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=(h, b),
      grid_names=("heads", "batch"), num_threads=2, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=kernel_interpret(interpret),
  )(x, bmat, cmat, dy_c, dyt, s, rows, pad_state(dfinal))
  # The block's last token: Σ_j dw_j and g · Σ G ∘ S (cs_last enters w and g).
  gate = rows[:, :, 4].reshape(b, h, nb, BLOCK)[..., 0]
  dlast = dw.reshape(b, h, nb, BLOCK).sum(-1) + gate * gs.sum(-1)
  last = jnp.arange(BLOCK) == BLOCK - 1
  dcs = dcs.reshape(b, h, nb, BLOCK) + jnp.where(last, dlast[..., None], 0.0)
  dcs = jnp.transpose(dcs.reshape(b, h, t), (0, 2, 1))
  return (dx[..., :d], db[..., :n], dc[..., :n], dcs,
          unpadded_t(ds0[..., :d, :n]))
