"""One chunk of the SSD backward, shared by the TPU and GPU backward kernels.

Legend: layers/__init__.py. Per-token scalars come both as columns [B, 1]
(tokens on sublanes / rows) and rows [1, B]; the kernels build them (tpu_bwd:
from a row by a masked lane sum; gpu_bwd: by indexing a vector). The forward
of one chunk (tpu.py) is, with X = x·dt [B, d], S the entering state [N, d]
(transposed), M[i, j] = [j <= i, same document] · exp(cs_i - cs_j):

    Y      = ((C Bᵀ) ∘ M) X + e ∘ (C S)              e_i = exp(cs_i) · keep_i
    S_next = g · S + (w ∘ B)ᵀ X                      w_j = exp(cs_last - cs_j) · to_end_j
                                                      g = exp(cs_last) · survives

and this step maps (dY, dS_next) to (dX, dB, dC, dcs, dS): plain products of
those, no transposed operand (Mᵀ, Bᵀ, Cᵀ are built or passed in instead). dcs
is the gradient of the in-chunk cumulative log decay cs; the wrapper turns it
into dt and a gradients (a reverse cumulative sum).
"""

import dataclasses

from jax import lax
import jax.numpy as jnp

NN = (((1,), (0,)), ((), ()))
NT = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class ChunkInputs:
  """What one chunk's backward reads (arrays; all float32 but x, b, c, bt, ct)."""
  cs_col: object  # [B, 1] in-chunk cumulative log decay
  cs_row: object  # [1, B]
  doc_col: object  # [B, 1] document index
  doc_row: object  # [1, B]
  keep_col: object  # [B, 1] token continues the entering state's document
  keep_row: object  # [1, B]
  to_end_col: object  # [B, 1] token is in the chunk's last document
  last_row: object  # bool [1, B]: the chunk's last token
  x: object  # [B, d] x·dt (compute dtype)
  b: object  # [B, N] (compute dtype)
  c: object  # [B, N]
  bt: object  # [N, B] B transposed
  ct: object  # [N, B] C transposed
  state: object  # [N, d] float32, the entering state
  dy: object  # [B, d] float32
  dstate: object  # [N, d] float32, gradient of the leaving state


def _lane_sum(z):
  return jnp.sum(z, axis=1, keepdims=True)


def _sublane_sum(z):
  return jnp.sum(z, axis=0, keepdims=True)


def backward_step(v: ChunkInputs, *, dot, row_of):
  """(dx [B, d], db [B, N], dc [B, N], dcs [1, B], dstate_in [N, d]), all float32.

  dot(a, b, dims): float32-accumulated dot_general. row_of(col [B, 1]) -> [1, B].
  """
  length = v.x.shape[0]
  compute = v.x.dtype
  f32 = jnp.float32
  rows = lax.broadcasted_iota(jnp.int32, (length, length), 0)
  cols = lax.broadcasted_iota(jnp.int32, (length, length), 1)
  same = v.doc_col == v.doc_row
  visible = (rows >= cols) & same  # [i, j]: j <= i
  visible_t = (rows <= cols) & same  # [j, i]: the transposed mask
  decay = jnp.where(visible, jnp.exp(jnp.where(visible, v.cs_col - v.cs_row, 0.0)), 0.0)
  decay_t = jnp.where(visible_t, jnp.exp(jnp.where(visible_t, v.cs_row - v.cs_col, 0.0)), 0.0)

  cs_last = _lane_sum(jnp.where(v.last_row, v.cs_row, 0.0))  # [1, 1]
  survives = _lane_sum(jnp.where(v.last_row, v.keep_row, 0.0))
  gate = jnp.exp(cs_last) * survives
  e_col = jnp.exp(v.cs_col) * v.keep_col
  e_row = jnp.exp(v.cs_row) * v.keep_row
  w_col = jnp.exp(cs_last - v.cs_col) * v.to_end_col

  dy_c = v.dy.astype(compute)
  scores = dot(v.c, v.b, NT)  # C Bᵀ [i, j]
  scores_t = dot(v.b, v.c, NT)  # B Cᵀ [j, i]
  dy_x = dot(dy_c, v.x, NT)  # dY Xᵀ [i, j]
  x_dy = dot(v.x, dy_c, NT)  # X dYᵀ [j, i]

  x_dstate = dot(v.x.astype(f32), v.dstate, NT)  # X dSᵀ [B, N]
  dx = (dot((scores_t * decay_t).astype(compute), dy_c, NN)
        + dot(v.b.astype(f32) * w_col, v.dstate, NN))
  dc = (dot((dy_x * decay).astype(compute), v.b, NN)
        + e_col * dot(v.dy, v.state, NT))
  db = (dot((x_dy * decay_t).astype(compute), v.c, NN)
        + w_col * x_dstate)

  # cs enters through M (cs_i - cs_j), e (cs_i), w (cs_last - cs_j) and g (cs_last).
  through_m = dy_x * scores * decay  # [i, j]
  carried = dot(v.c.astype(f32), v.state, NN)  # C S [B, d]
  de = _lane_sum(v.dy * carried) * e_col  # [B, 1]
  dw = _lane_sum(v.b.astype(f32) * x_dstate) * w_col  # [B, 1]
  # [1, 1] sums (lane then sublane): no 0-d values in the kernels.
  dgate = _sublane_sum(_lane_sum(v.dstate * v.state)) * gate
  dlast = _sublane_sum(dw) + dgate
  dcs = (row_of(_lane_sum(through_m) + de - dw) - _sublane_sum(through_m)
         + jnp.where(v.last_row, dlast, 0.0))
  dstate_in = gate * v.dstate + dot(v.ct.astype(f32) * e_row, v.dy, NN)
  return dx, db, dc, dcs, dstate_in
