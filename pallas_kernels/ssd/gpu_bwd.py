"""GPU SSD backward kernel (Pallas on Triton): one program per (batch, head), blocks in reverse.

Legend: layers/__init__.py. Layouts are the forward's (gpu.py), plus the states
saved by the forward [b, h, ceil(nb / save_every), N, d], dY float32
[b, t, h, d] and the final state's gradient float32 [b, h, N, d] (transposed).

A program walks its blocks from the last to the first (`lax.fori_loop`),
carrying the state gradient dS [N, d] in registers. The forward saved the
state entering every save_every-th block only (chunk_size / B, at most 4:
the xla path's residual size at chunk 256, not 4x it at B = 64): the state
entering block i is that saved state advanced over the blocks of its group
before i (save_every - 1 guarded updates, recomputed). Each block is
bwd_step.backward_step (columns and rows of the per-token scalars are
vector[:, None] and vector[None, :]; Bᵀ and Cᵀ are register transposes).
dB and dC come out per head (float32 [b, t, h, N]); the wrapper sums the heads
of each group.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.triton as plgpu_triton
import jax.numpy as jnp

from pallas_kernels.ssd import bwd_step
from pallas_kernels.ssd.gpu import advance, dot


def _kernel(x_ref, cs_ref, doc_ref, keep_ref, end_ref, b_ref, c_ref, states_ref, dy_ref,
            dsf_ref, dx_ref, db_ref, dc_ref, dcs_ref, ds0_ref, *, block: int, num_blocks: int,
            save_every: int):
  """One (batch, head): every block, last first."""
  last_row = (lax.broadcasted_iota(jnp.int32, (block,), 0) == block - 1)[None, :]

  def tokens_of(i):
    return pl.ds(pl.multiple_of(i * block, block), block)

  def entering_state(i):
    """The state entering block i: the saved one of its group, advanced block by block."""
    group = lax.div(i, jnp.int32(save_every))
    first = group * save_every
    state = states_ref[group]
    for r in range(save_every - 1):
      earlier = jnp.minimum(first + r, i)  # In bounds; its update is dropped when == i.
      tokens = tokens_of(earlier)
      advanced = advance(state, x_ref[tokens, :], b_ref[tokens, :], cs_ref[tokens],
                         keep_ref[tokens], end_ref[tokens])
      state = jnp.where(first + r < i, advanced, state)
    return state

  def step(k, dstate):
    i = num_blocks - 1 - k
    tokens = tokens_of(i)
    cs, doc = cs_ref[tokens], doc_ref[tokens]
    keep, to_end = keep_ref[tokens], end_ref[tokens]
    bmat, cmat = b_ref[tokens, :], c_ref[tokens, :]
    inputs = bwd_step.ChunkInputs(
        cs_col=cs[:, None], cs_row=cs[None, :], doc_col=doc[:, None], doc_row=doc[None, :],
        keep_col=keep[:, None], keep_row=keep[None, :], to_end_col=to_end[:, None],
        last_row=last_row, x=x_ref[tokens, :], b=bmat, c=cmat, bt=bmat.T, ct=cmat.T,
        state=entering_state(i), dy=dy_ref[tokens, :], dstate=dstate)
    dx, db, dc, dcs, dstate_in = bwd_step.backward_step(
        inputs, dot=dot, row_of=lambda col: col.reshape(1, block))
    dx_ref[tokens, :] = dx
    db_ref[tokens, :] = db
    dc_ref[tokens, :] = dc
    dcs_ref[tokens] = dcs.reshape(block)
    return dstate_in

  ds0_ref[...] = lax.fori_loop(0, num_blocks, step, dsf_ref[...])


def backward(x_dt, cs, doc, keep, to_end, bmat, cmat, states, dy, dfinal, *, block: int,
             num_warps: int, interpret, save_every: int = 1):
  """The reverse blocked scan.

  Args: as gpu.forward, plus states float32 [b, h, ceil(nb / save_every), N, d]
    (gpu.forward's), dy float32 [b, t, h, d], dfinal float32 [b, h, N, d].

  Returns:
    float32 dx [b, t, h, d] (of x·dt), db and dc [b, t, h, N] (per head),
    dcs [b, t, h], dinitial [b, h, N, d].
  """
  b, padded, h, d = x_dt.shape
  ng, n = bmat.shape[2], bmat.shape[3]
  group = h // ng
  nb = padded // block
  saved = states.shape[2]
  per_token = pl.BlockSpec((None, padded), lambda i, j: (i, 0))
  heads = lambda width: pl.BlockSpec(  # noqa: E731
      (None, padded, None, width), lambda i, j: (i, 0, j, 0))
  grouped = pl.BlockSpec((None, padded, None, n), lambda i, j: (i, 0, j // group, 0))
  per_head = pl.BlockSpec((None, None, n, d), lambda i, j: (i, j, 0, 0))
  scalars = pl.BlockSpec((None, padded, None), lambda i, j: (i, 0, j))
  in_specs = [heads(d), scalars, per_token, per_token, per_token, grouped, grouped,
              pl.BlockSpec((None, None, saved, n, d), lambda i, j: (i, j, 0, 0, 0)),
              heads(d), per_head]
  out_specs = [heads(d), heads(n), heads(n), scalars, per_head]
  f32 = jnp.float32
  out_shape = [jax.ShapeDtypeStruct((b, padded, h, d), f32),
               jax.ShapeDtypeStruct((b, padded, h, n), f32),
               jax.ShapeDtypeStruct((b, padded, h, n), f32),
               jax.ShapeDtypeStruct((b, padded, h), f32),
               jax.ShapeDtypeStruct((b, h, n, d), f32)]
  return pl.pallas_call(
      functools.partial(_kernel, block=block, num_blocks=nb, save_every=save_every),
      grid=(b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="ssd_bwd_gpu",
  )(x_dt, cs, doc, keep, to_end, bmat, cmat, states, dy, dfinal)
