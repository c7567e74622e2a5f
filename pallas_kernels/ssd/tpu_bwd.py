"""Mosaic TPU SSD backward kernel: the reverse chunk scan, one (batch, head, chunk) per step.

Legend: layers/__init__.py. Layouts are the forward's (tpu.py), plus C
chunk-transposed Cᵀ [b, ng, nb, N, B], the states entering each chunk saved by
the forward [b, h, nb, N, d], dY float32 [b, h, t, d] and the final state's
gradient float32 [b, h, N, d] (transposed).

Grid (b, h, nb) with the chunk axis "arbitrary" and walked backwards (index
maps read chunk nb-1-c): the state gradient dS [N, d] lives in VMEM scratch,
starts as the final state's gradient, and after chunk 0 is the initial
state's. Each step is bwd_step.backward_step. dB and dC come out per head
(float32 [b, h, t, N]); the wrapper sums the heads of each group.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.ssd import bwd_step
from pallas_kernels.ssd.tpu import column


def _row(col, eye):
  """[B, 1] column -> [1, B] row with the same values (exact)."""
  square = jnp.broadcast_to(col, eye.shape)
  return jnp.sum(jnp.where(eye, square, 0.0), axis=0, keepdims=True)


def _kernel(cs_ref, rows_ref, x_ref, b_ref, bt_ref, c_ref, ct_ref, states_ref, dy_ref, dsf_ref,
            dx_ref, db_ref, dc_ref, dcs_ref, ds0_ref, dstate_ref, *, num_chunks: int):
  step = pl.program_id(2)
  length = x_ref.shape[0]

  @pl.when(step == 0)
  def _():
    dstate_ref[...] = dsf_ref[...]

  eye = (lax.broadcasted_iota(jnp.int32, (length, length), 0)
         == lax.broadcasted_iota(jnp.int32, (length, length), 1))
  cs = cs_ref[...]
  doc, keep, to_end = rows_ref[0:1, :], rows_ref[1:2, :], rows_ref[2:3, :]
  inputs = bwd_step.ChunkInputs(
      cs_col=column(cs, eye), cs_row=cs, doc_col=column(doc, eye), doc_row=doc,
      keep_col=column(keep, eye), keep_row=keep, to_end_col=column(to_end, eye),
      last_row=lax.broadcasted_iota(jnp.int32, cs.shape, 1) == length - 1,
      x=x_ref[...], b=b_ref[...], c=c_ref[...], bt=bt_ref[...], ct=ct_ref[...],
      state=states_ref[...], dy=dy_ref[...], dstate=dstate_ref[...])
  dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32)
  dx, db, dc, dcs, dstate_in = bwd_step.backward_step(
      inputs, dot=lambda a, b, dims: dot(a, b, dims), row_of=lambda col: _row(col, eye))
  dx_ref[...] = dx
  db_ref[...] = db
  dc_ref[...] = dc
  dcs_ref[...] = dcs
  dstate_ref[...] = dstate_in

  @pl.when(step == num_chunks - 1)
  def _():
    ds0_ref[...] = dstate_ref[...]


def backward(x_dt, cs, rows, bmat, bmat_t, cmat, cmat_t, states, dy, dfinal, *, chunk: int,
             interpret):
  """The reverse chunk scan.

  Args: as tpu.forward, plus cmat_t [b, ng, nb, N, B], states float32
    [b, h, nb, N, d] (entering each chunk), dy float32 [b, h, t, d], dfinal
    float32 [b, h, N, d].

  Returns:
    float32 dx [b, h, t, d] (of x·dt), db and dc [b, h, t, N] (per head),
    dcs [b, h, nb, 1, B], dinitial [b, h, N, d].
  """
  b, h, padded, d = x_dt.shape
  ng, n = bmat.shape[1], bmat.shape[3]
  group = h // ng
  nb = padded // chunk
  rev = lambda c: nb - 1 - c  # noqa: E731
  tokens = lambda width: pl.BlockSpec(  # noqa: E731
      (None, None, chunk, width), lambda i, j, c: (i, j, rev(c), 0))
  grouped = lambda: pl.BlockSpec(  # noqa: E731
      (None, None, chunk, n), lambda i, j, c: (i, j // group, rev(c), 0))
  grouped_t = lambda: pl.BlockSpec(  # noqa: E731
      (None, None, None, n, chunk), lambda i, j, c: (i, j // group, rev(c), 0, 0))
  per_head = pl.BlockSpec((None, None, n, d), lambda i, j, c: (i, j, 0, 0))
  in_specs = [
      pl.BlockSpec((None, None, None, 1, chunk), lambda i, j, c: (i, j, rev(c), 0, 0)),
      pl.BlockSpec((None, None, 3, chunk), lambda i, j, c: (i, rev(c), 0, 0)),
      tokens(d), grouped(), grouped_t(), grouped(), grouped_t(),
      pl.BlockSpec((None, None, None, n, d), lambda i, j, c: (i, j, rev(c), 0, 0)),
      tokens(d), per_head,
  ]
  out_specs = [tokens(d), tokens(n), tokens(n),
               pl.BlockSpec((None, None, None, 1, chunk), lambda i, j, c: (i, j, rev(c), 0, 0)),
               per_head]
  f32 = jnp.float32
  out_shape = [jax.ShapeDtypeStruct((b, h, padded, d), f32),
               jax.ShapeDtypeStruct((b, h, padded, n), f32),
               jax.ShapeDtypeStruct((b, h, padded, n), f32),
               jax.ShapeDtypeStruct((b, h, nb, 1, chunk), f32),
               jax.ShapeDtypeStruct((b, h, n, d), f32)]
  return pl.pallas_call(
      functools.partial(_kernel, num_chunks=nb),
      grid=(b, h, nb), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((n, d), f32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="ssd_bwd",
  )(cs, rows, x_dt, bmat, bmat_t, cmat, cmat_t, states, dy, dfinal)
