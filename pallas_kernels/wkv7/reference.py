"""The RWKV-7 WKV recurrence (a generalized delta rule with a vector decay), plain jnp.

Per head, with a state S [d, d] (value rows i, key columns j):

    S_t = S_{t-1} · diag(w_t) + (S_{t-1} · a_t) b_tᵀ + v_t k_tᵀ        y_t = S_t · r_t

RWKV-7 uses a = −k̂ (the normalised key) and b = k̂ · iclr (the in-context
learning rate), so (S a) bᵀ removes part of the value stored under k̂ before
v kᵀ writes the new one. Note that the removal term reads S_{t-1}, not the
decayed state. Documents of a packed row never see each other: the state is
reset to zero where the document index changes, and a decode call continues
from the previous call's state.

Two plain-jnp forms, the oracle of the Pallas kernels beside this file and the
model's `xla` path (layers/rwkv/wkv7.py re-exports them): `wkv7`, a `lax.scan`
over tokens with the state carried in float32 (exact, sequential: decode steps),
and `wkv7_chunked`, the matrix form per chunk with a scan between chunks (the
training form; chunk.py is the kernels' version of its `_chunk_step`).

Shapes (layers/__init__.py): b batch, t sequence, h heads, d head size.
"""

import jax
import jax.numpy as jnp


def wkv7(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, a: jax.Array, b: jax.Array,
         *, doc: jax.Array | None = None,
         initial_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The WKV-7 recurrence over a whole sequence.

  Args:
    r, w, k, v, a, b: [b, t, h, d]; w is the per-channel decay in (0, 1).
    doc: int [b, t] document index (layers.ssm.document_index): the state
      restarts from zero where it changes, and token 0 continues
      `initial_state` only where doc[:, 0] == 0. None: one document per row.
    initial_state: float32 [b, h, d, d] the state before the first token; None: zeros.
  Returns:
    (y [b, t, h, d] in r.dtype, the float32 state after the last token [b, h, d, d]).
  """
  batch, t, h, d = r.shape
  if initial_state is None:
    initial_state = jnp.zeros((batch, h, d, d), jnp.float32)
  if doc is None:
    doc = jnp.zeros((batch, t), jnp.int32)
  previous = jnp.concatenate([jnp.zeros((batch, 1), doc.dtype), doc[:, :-1]], axis=1)
  keep = (doc == previous).astype(jnp.float32)  # [b, t] 0 where a new document starts.
  time_major = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)  # noqa: E731
  inputs = tuple(time_major(x) for x in (r, w, k, v, a, b)) + (jnp.moveaxis(keep, 1, 0),)

  def step(state, xs):
    r_t, w_t, k_t, v_t, a_t, b_t, keep_t = xs  # [b, h, d] each, keep_t [b]
    state = state * keep_t[:, None, None, None]
    removed = jnp.einsum("bhij,bhj->bhi", state, a_t, precision=jax.lax.Precision.HIGHEST)
    state = (state * w_t[:, :, None, :] + removed[..., None] * b_t[:, :, None, :]
             + v_t[..., None] * k_t[:, :, None, :])
    return state, jnp.einsum("bhij,bhj->bhi", state, r_t, precision=jax.lax.Precision.HIGHEST)

  state, y = jax.lax.scan(step, initial_state.astype(jnp.float32), inputs)
  return jnp.moveaxis(y, 0, 1).astype(r.dtype), state


_HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(equation: str, *operands) -> jax.Array:
  """float32 einsum at full precision (no bf16 / TF32 passes: the chunk form is float32)."""
  return jnp.einsum(equation, *operands, precision=_HIGHEST)


def unit_lower_inverse(a: jax.Array) -> jax.Array:
  """(I − a)⁻¹ for strictly lower-triangular a [..., B, B] (B a power of two), by matmuls only.

  Block doubling: X holds the inverses of the diagonal blocks of size s; merging
  two neighbours, the inverse of [[I − a₁₁, 0], [−a₂₁, I − a₂₂]] is
  [[X₁, 0], [X₂ a₂₁ X₁, X₂]], so X ← X + X M X with M the a₂₁ blocks of every
  2s-block, log₂ B times. Every intermediate is a block of the true inverse, so
  nothing grows beyond it. (The Neumann product (I + a)(I + a²)(I + a⁴)... computes
  the same matrix from powers of a, which grow like binomial coefficients when
  a's entries are near ±1, as for RWKV-7's trained, correlated keys: at B = 64 it
  lost every digit in float32, while the true inverse stays O(1).) Used instead of
  `lax.linalg.triangular_solve`, whose CPU lowering inside the chunk scan stalled
  a training run (and matmuls suit GPU/TPU).
  """
  length = a.shape[-1]
  rows = jnp.arange(length)[:, None]
  cols = jnp.arange(length)[None, :]
  inverse = jnp.broadcast_to(jnp.eye(length, dtype=a.dtype), a.shape)
  size = 1
  while size < length:
    lower_left = (rows // (2 * size) == cols // (2 * size)) & (rows // size % 2 == 1) & (
        cols // size % 2 == 0)
    inverse = inverse + _einsum("...ij,...jk,...kl->...il", inverse, jnp.where(lower_left, a, 0.0),
                                inverse)
    size *= 2
  return inverse


def _chunk_step(state, chunk):
  """One chunk of the WKV-7 recurrence in matrix form, from the state before it.

  state float32 [b, h, d, d]; chunk = (r, logw, k, v, a, b [b, B, h, d] float32,
  doc int [b, B], prev_doc int [b]) -> (the state after the chunk, y [b, B, h, d]).
  """
  r, logw, k, v, a, b, doc, prev_doc = chunk
  length = r.shape[1]
  incl = jnp.cumsum(logw, axis=1)  # log Γ_t = Σ_{i<=t} log w_i
  excl = incl - logw  # log Γ_{t-1}
  same = doc[:, :, None] == doc[:, None, :]  # [b, t, j]
  lower = jnp.tril(jnp.ones((length, length), bool))
  strict = jnp.tril(jnp.ones((length, length), bool), -1)
  mask_incl = (same & lower)[..., None, None]  # [b, t, j, 1, 1]
  mask_strict = (same & strict)[..., None, None]
  # Pairwise decays exp(log Γ_t − log Γ_j) (and from Γ_{t-1}), only where j <= t (j < t):
  # exponents <= 0, so nothing overflows; masked entries are exactly zero.
  decay_incl = jnp.exp(jnp.where(mask_incl, incl[:, :, None] - incl[:, None, :], -jnp.inf))
  decay_strict = jnp.exp(jnp.where(mask_strict, excl[:, :, None] - incl[:, None, :], -jnp.inf))
  from_state = (doc == prev_doc[:, None]).astype(jnp.float32)  # [b, t] no reset since S_0

  # u_t = S_{t-1} a_t, which itself depends on u_j (j < t): (I − A_b) U = S_0 terms + A_k V.
  a_k = _einsum("bthc,btjhc,bjhc->bhtj", a, decay_strict, k)
  a_b = _einsum("bthc,btjhc,bjhc->bhtj", a, decay_strict, b)
  rhs = (_einsum("bhic,bthc->bhti", state, a * jnp.exp(excl) * from_state[..., None, None])
         + _einsum("bhtj,bjhi->bhti", a_k, v))
  u = _einsum("bhts,bhsi->bhti", unit_lower_inverse(a_b), rhs)  # [b, h, t, i]

  att_k = _einsum("bthc,btjhc,bjhc->bhtj", r, decay_incl, k)
  att_b = _einsum("bthc,btjhc,bjhc->bhtj", r, decay_incl, b)
  y = (_einsum("bhic,bthc->bthi", state, r * jnp.exp(incl) * from_state[..., None, None])
       + _einsum("bhtj,bjhi->bthi", att_k, v) + _einsum("bhtj,bhji->bthi", att_b, u))

  # The state after the chunk: S_0 decayed through it, plus every token's write decayed
  # from its position to the end (only the last token's document survives).
  last = incl[:, -1:]  # [b, 1, h, d]
  to_end = jnp.exp(last - incl) * (doc == doc[:, -1:])[..., None, None]  # [b, j, h, c]
  keep = (doc[:, -1] == prev_doc).astype(jnp.float32)[:, None, None, None]
  new_state = (state * jnp.exp(last[:, 0])[:, :, None, :] * keep
               + _einsum("bjhi,bjhc->bhic", v, k * to_end)
               + _einsum("bhji,bjhc->bhic", u, b * to_end))
  return new_state, y


def wkv7_chunked(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, a: jax.Array,
                 b: jax.Array, *, chunk_size: int = 16, doc: jax.Array | None = None,
                 initial_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """`wkv7` computed by chunks: a matrix form inside each chunk, a `lax.scan` between them.

  Inside a chunk of B tokens, with Γ_t the running product of decays since the
  chunk's start and u_t = S_{t-1} a_t the vector each token removes:

      (I − A_b) U = [S_0 (Γ_{t-1} ⊙ a_t)]_t + A_k V     (unit lower-triangular: U by matmuls)
      y_t = S_0 (Γ_t ⊙ r_t) + Σ_{j<=t} (r_t ⊙ Γ_t/Γ_j)·k_j v_j + (r_t ⊙ Γ_t/Γ_j)·b_j u_j

  with A_k[t, j] = (a_t ⊙ Γ_{t-1}/Γ_j)·k_j and A_b likewise with b_j (j < t). The
  pairwise decays Γ_t/Γ_j are formed directly as exp(Σ_{j<i<=t} log w_i), never as
  a ratio, so they stay in [0, 1]; pairs across a document boundary are masked to
  zero. Everything is float32. Any length (padded internally with w = 1 and zero
  inputs, which leave the state unchanged). Assumes w bounded away from zero
  (RWKV-7: w >= exp(−e^{−1/2}) ≈ 0.545), since log w enters a cumulative sum.

  Args and returns: as `wkv7`, plus chunk_size, the tokens per chunk B.
  """
  batch, t, h, d = r.shape
  chunk = max(1, min(chunk_size, t))
  if initial_state is None:
    initial_state = jnp.zeros((batch, h, d, d), jnp.float32)
  if doc is None:
    doc = jnp.zeros((batch, t), jnp.int32)
  doc = doc.astype(jnp.int32)
  pad = (-t) % chunk
  f32 = lambda x: jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))  # noqa: E731
  logw = f32(jnp.log(w.astype(jnp.float32)))  # padding: log w = 0, w = 1
  doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")
  n = (t + pad) // chunk
  split = lambda x: jnp.moveaxis(x.reshape((batch, n, chunk) + x.shape[2:]), 1, 0)  # noqa: E731
  doc_chunks = split(doc)
  prev_doc = jnp.concatenate([jnp.zeros((1, batch), jnp.int32), doc_chunks[:-1, :, -1]], axis=0)
  xs = tuple(split(x) for x in (f32(r), logw, f32(k), f32(v), f32(a), f32(b))) + (
      doc_chunks, prev_doc)
  state, y = jax.lax.scan(_chunk_step, initial_state.astype(jnp.float32), xs)
  y = jnp.moveaxis(y, 0, 1).reshape(batch, t + pad, h, d)[:, :t]
  return y.astype(r.dtype), state
