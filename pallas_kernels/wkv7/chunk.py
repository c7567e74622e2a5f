"""One chunk of the WKV-7 recurrence in matrix form, as 2-D float32 array code for a kernel body.

Both kernels (tpu.py, gpu.py) run `chunk_step` on one head's chunk, read from
their refs; it uses only what Mosaic TPU and Triton both lower: 2-D matmuls at
float32 precision (`Precision.HIGHEST`: Triton's IEEE dot, the TPU's 6-pass
bf16), elementwise ops, iota masks and reductions (no slices, no cumsum, no
triangular solve). The maths is reference.py's `_chunk_step`, per head:

    Γ_t = Π_{i<=t} w_i (from the chunk's start), cumulated as L·log w (L lower ones)
    (I − A_b) U = (a ⊙ Γ_{t-1} ⊙ f) Sᵀ + A_k V       U [B, d]: u_t = S_{t-1} a_t
    y = (r ⊙ Γ ⊙ f) Sᵀ + R_k V + R_b U
    S' = S ⊙ Γ_B·keep + Vᵀ (K ⊙ Γ_B/Γ) + Uᵀ (Bm ⊙ Γ_B/Γ)

with f_t = 1 where token t continues the state S from before the chunk (same
document), A_k[t, j] = Σ_c a_tc Γ_{t-1,c}/Γ_jc k_jc for j < t in t's document
(A_b with b; R_k, R_b with r and Γ_t, j <= t). (I − A_b)⁻¹ is built by block
doubling, by matmuls (`_unit_lower_inverse`).

The pairwise decays Γ_t/Γ_j are factored as exp(log Γ_t − m)·exp(m − log Γ_j)
around m = log Γ at the chunk's middle (reference.py forms them from masked log
sums instead, which needs a [B, B, d] tensor): both factors stay below
exp(B/2 · max(−log w)), about e^{19} for B = 64 and RWKV-7's w >= 0.545, far
inside float32, and pairs outside the causal, same-document mask are zeroed
after the product. Decays much faster than that (w → 0) would overflow: the
kernel serves RWKV-7's bounded decay, not an arbitrary w (api.py says so).

Shapes (layers/__init__.py): B chunk length, d head size.
"""

import jax
from jax import lax
import jax.numpy as jnp

_HIGHEST = lax.Precision.HIGHEST


def _dot(x, y, contract_x: int = 1, contract_y: int = 0):
  """float32 matmul contracting x's axis contract_x with y's axis contract_y."""
  return lax.dot_general(x, y, (((contract_x,), (contract_y,)), ((), ())),
                         precision=(_HIGHEST, _HIGHEST), preferred_element_type=jnp.float32)


def _nt(x, y):
  """x yᵀ: [n, c] x [m, c] -> [n, m]."""
  return _dot(x, y, 1, 1)


def _tn(x, y):
  """xᵀ y: [c, n] x [c, m] -> [n, m]."""
  return _dot(x, y, 0, 0)


def _row(x, index: int):
  """x[index] of x [n, c] as [1, c], by a masked sum (no slicing)."""
  rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  return jnp.sum(jnp.where(rows == index, x, 0.0), axis=0, keepdims=True)


def _unit_lower_inverse(lower, eye):
  """(I − A)⁻¹ for strictly lower-triangular A [B, B] (B a power of two), by matmuls.

  reference.unit_lower_inverse's block doubling (stable where the Neumann
  product of powers of A is not): X ← X + X M X, M the lower-left quarter of
  every 2s-block of A, for s = 1, 2, 4, ...; block positions from iota shifts.
  """
  length = lower.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, lower.shape, 0)
  cols = lax.broadcasted_iota(jnp.int32, lower.shape, 1)
  inverse, shift = eye, 0
  while (1 << shift) < length:
    half, pair = jnp.int32(shift), jnp.int32(shift + 1)
    same_pair = lax.shift_right_logical(rows, pair) == lax.shift_right_logical(cols, pair)
    row_second = (lax.shift_right_logical(rows, half) & 1) == 1
    col_first = (lax.shift_right_logical(cols, half) & 1) == 0
    crossing = jnp.where(same_pair & row_second & col_first, lower, 0.0)
    inverse = inverse + _dot(_dot(inverse, crossing), inverse)
    shift += 1
  return inverse


def chunk_step(state, r, logw, k, v, a, b, same, from_state, to_end):
  """The state after one chunk and the chunk's outputs.

  Args:
    state: float32 [d, d] the state before the chunk (value rows, key columns).
    r, logw, k, v, a, b: float32 [B, d]; logw = log w (0 on padded tokens).
    same: float32 [B, B] 1 where tokens t and j share a document.
    from_state: float32 [B, 1] 1 where token t continues `state` (its document is
      the one of the token before the chunk).
    to_end: float32 [B, 1] 1 where token j shares the chunk's last token's document.
  Returns:
    (new state float32 [d, d], y float32 [B, d]).
  """
  length = r.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (length, length), 0)
  cols = lax.broadcasted_iota(jnp.int32, (length, length), 1)
  eye = jnp.where(rows == cols, 1.0, 0.0)
  mask_incl = jnp.where(rows >= cols, same, 0.0)
  mask_strict = jnp.where(rows > cols, same, 0.0)

  incl = _dot(jnp.where(rows >= cols, 1.0, 0.0), logw)  # log Γ_t [B, d]
  excl = incl - logw  # log Γ_{t-1}
  last = _row(incl, length - 1)  # log Γ_B [1, d]
  middle = _row(incl, length // 2 - 1)
  key_scale = jnp.exp(middle - incl)  # Γ_m / Γ_j
  k_rel, b_rel = k * key_scale, b * key_scale
  a_rel = a * jnp.exp(excl - middle)  # a_t Γ_{t-1} / Γ_m
  r_rel = r * jnp.exp(incl - middle)

  a_k = _nt(a_rel, k_rel) * mask_strict  # [B, B]
  a_b = _nt(a_rel, b_rel) * mask_strict
  rhs = _nt(a * jnp.exp(excl) * from_state, state) + _dot(a_k, v)  # [B, d]
  u = _dot(_unit_lower_inverse(a_b, eye), rhs)

  r_k = _nt(r_rel, k_rel) * mask_incl
  r_b = _nt(r_rel, b_rel) * mask_incl
  y = _nt(r * jnp.exp(incl) * from_state, state) + _dot(r_k, v) + _dot(r_b, u)

  to_end_decay = jnp.exp(last - incl) * to_end  # Γ_B / Γ_j on the last token's document
  keep = _row(from_state, length - 1)  # [1, 1] the last token continues `state`
  new_state = (state * (jnp.exp(last) * keep) + _tn(v, k * to_end_decay)
               + _tn(u, b * to_end_decay))
  return new_state, y


def chunk_step_vjp(state, r, logw, k, v, a, b, same, from_state, to_end, d_new_state, dy):
  """The cotangents of `chunk_step` in (state, r, logw, k, v, a, b), for a kernel body.

  jax.vjp of the chunk's matrix form, traced inside the backward kernel: its
  jaxpr is again 2-D matmuls (some transposed), elementwise ops, selects and
  reductions, which both lowerings take. The masks get no cotangent.

  Args:
    as `chunk_step`; d_new_state float32 [d, d] and dy float32 [B, d] the
    cotangents of its two results.
  Returns:
    (d_state [d, d], dr, dlogw, dk, dv, da, db [B, d]), float32.
  """
  step = lambda *xs: chunk_step(*xs, same, from_state, to_end)  # noqa: E731
  _, vjp = jax.vjp(step, state, r, logw, k, v, a, b)
  return vjp((d_new_state, dy))
