"""Mosaic TPU SSD forward kernel: one (batch, head, chunk) per grid step, state in VMEM.

Legend: layers/__init__.py. Kernel layout is head-major (api.py transposes):
x·dt [b, h, t, d], B and C [b, ng, t, N], with t padded to whole chunks of B
tokens. Per-token scalars arrive as rows (lanes = tokens): the in-chunk
cumulative log decay cs [b, h, nb, 1, B] and, per batch row, the document
index, "continues the carried state" and "reaches the chunk's end" flags
[b, nb, 3, B] (float32 0/1; see api.chunk_rows).

Grid (b, h, nb): batch and heads "parallel", chunks "arbitrary" (in order on
one core), so the float32 state [N, d] lives in a VMEM scratch across the
chunk axis: loaded from the initial state at chunk 0, written out after the
last chunk. Per step:

  y   = ((C·Bᵀ) ∘ decay ∘ same document) · (x·dt)       the chunk's own tokens
      + exp(cs) · keep ∘ (C · S)                         the carried state
  S  <- exp(cs_last) · survives · S + (to_end ∘ B)ᵀ · (x·dt)

decay[i, j] = exp(cs_i - cs_j) for j <= i. No vector transposes in the
kernel: the state is kept transposed ([N, d]) so the read-out is a plain
matmul; the one contraction over tokens, (to_end ∘ B)ᵀ · (x·dt), reads B a
second time in a chunk-transposed copy Bᵀ [b, ng, nb, N, B] made by XLA
(B is ng·N per token, small next to x's h·d). Columns of the per-token rows
(tokens on sublanes) are read off the diagonal of the broadcast row (a
masked lane sum: exact); the chunk's last value is a masked lane sum too.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))


def column(row, eye):
  """[1, B] row -> [B, 1] column with the same values (exact)."""
  square = jnp.broadcast_to(row, eye.shape)
  return jnp.sum(jnp.where(eye, square, 0.0), axis=1, keepdims=True)


def _kernel(cs_ref, rows_ref, x_ref, b_ref, bt_ref, c_ref, s0_ref, y_ref, sf_ref, *rest,
            num_chunks: int):
  """One (batch, head, chunk) step; rest is (states_ref, state_ref) or (state_ref,)."""
  states_ref, state_ref = rest if len(rest) == 2 else (None, rest[0])
  chunk = pl.program_id(2)
  length = x_ref.shape[0]

  @pl.when(chunk == 0)
  def _():
    state_ref[...] = s0_ref[...]

  shape = (length, length)
  row_i = lax.broadcasted_iota(jnp.int32, shape, 0)
  col_j = lax.broadcasted_iota(jnp.int32, shape, 1)
  eye = row_i == col_j
  cs = cs_ref[...]  # [1, B] float32
  doc, keep, to_end = rows_ref[0:1, :], rows_ref[1:2, :], rows_ref[2:3, :]  # [1, B] each
  cs_col, doc_col, keep_col = column(cs, eye), column(doc, eye), column(keep, eye)

  x = x_ref[...]  # [B, d] (x·dt, compute dtype)
  bmat, cmat = b_ref[...], c_ref[...]  # [B, N]
  visible = (row_i >= col_j) & (doc_col == doc)
  decay = jnp.exp(jnp.where(visible, cs_col - cs, -jnp.inf))  # [B, B]
  scores = lax.dot_general(cmat, bmat, _NT, preferred_element_type=jnp.float32)
  weights = (scores * decay).astype(x.dtype)
  y_diag = lax.dot_general(weights, x, _NN, preferred_element_type=jnp.float32)
  state = state_ref[...]  # [N, d] float32
  if states_ref is not None:
    states_ref[...] = state
  carried = lax.dot_general(cmat.astype(jnp.float32), state, _NN,
                            preferred_element_type=jnp.float32)
  y_ref[...] = y_diag + carried * (jnp.exp(cs_col) * keep_col)

  last = lax.broadcasted_iota(jnp.int32, cs.shape, 1) == length - 1
  cs_last = jnp.sum(jnp.where(last, cs, 0.0), axis=1, keepdims=True)  # [1, 1]
  survives = jnp.sum(jnp.where(last, keep, 0.0), axis=1, keepdims=True)
  weight = jnp.exp(cs_last - cs) * to_end  # [1, B]
  weighted_bt = (bt_ref[...].astype(jnp.float32) * weight).astype(x.dtype)  # [N, B]
  own = lax.dot_general(weighted_bt, x, _NN, preferred_element_type=jnp.float32)
  state_ref[...] = state * (jnp.exp(cs_last) * survives) + own

  @pl.when(chunk == num_chunks - 1)
  def _():
    sf_ref[...] = state_ref[...]


def forward(x_dt, cs, rows, bmat, bmat_t, cmat, initial_state, *, chunk: int, interpret,
            save_states: bool = False):
  """The chunked scan.

  Args:
    x_dt: [b, h, t, d] x·dt in the compute dtype (t padded to a multiple of chunk).
    cs: float32 [b, h, nb, 1, B] in-chunk cumulative log decay (inclusive).
    rows: float32 [b, nb, 3, B] document index, keep and to_end flags.
    bmat, cmat: [b, ng, t, N] in the compute dtype.
    bmat_t: B again, chunk-transposed: [b, ng, nb, N, B].
    initial_state: float32 [b, h, N, d] (transposed).

  Returns:
    y float32 [b, h, t, d] without the D·x skip; final state float32 [b, h, N, d];
    with save_states, also the state entering each chunk float32 [b, h, nb, N, d]
    (for the backward).
  """
  b, h, padded, d = x_dt.shape
  ng, n = bmat.shape[1], bmat.shape[3]
  group = h // ng
  nb = padded // chunk
  in_specs = [
      pl.BlockSpec((None, None, None, 1, chunk), lambda i, j, c: (i, j, c, 0, 0)),
      pl.BlockSpec((None, None, 3, chunk), lambda i, j, c: (i, c, 0, 0)),
      pl.BlockSpec((None, None, chunk, d), lambda i, j, c: (i, j, c, 0)),
      pl.BlockSpec((None, None, chunk, n), lambda i, j, c: (i, j // group, c, 0)),
      pl.BlockSpec((None, None, None, n, chunk), lambda i, j, c: (i, j // group, c, 0, 0)),
      pl.BlockSpec((None, None, chunk, n), lambda i, j, c: (i, j // group, c, 0)),
      pl.BlockSpec((None, None, n, d), lambda i, j, c: (i, j, 0, 0)),
  ]
  out_specs = [pl.BlockSpec((None, None, chunk, d), lambda i, j, c: (i, j, c, 0)),
               pl.BlockSpec((None, None, n, d), lambda i, j, c: (i, j, 0, 0))]
  out_shape = [jax.ShapeDtypeStruct((b, h, padded, d), jnp.float32),
               jax.ShapeDtypeStruct((b, h, n, d), jnp.float32)]
  if save_states:
    out_specs.append(pl.BlockSpec((None, None, None, n, d), lambda i, j, c: (i, j, c, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, nb, n, d), jnp.float32))
  return pl.pallas_call(
      functools.partial(_kernel, num_chunks=nb),
      grid=(b, h, nb), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((n, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="ssd_fwd",
  )(cs, rows, x_dt, bmat, bmat_t, cmat, initial_state)
