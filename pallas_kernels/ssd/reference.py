"""State-space duality (SSD, Mamba-2; Dao & Gu 2024, arXiv 2405.21060) computed by chunks.

The recurrence, per head h with a scalar decay and a state S [d, N]:

    S_t = exp(dt_t · A) · S_{t-1} + dt_t · x_t ⊗ B_t        y_t = S_t · C_t + D · x_t

is evaluated in chunks of `chunk_size` tokens: inside a chunk as masked
matmuls (a causal "attention" whose weights are C_i·B_j · exp(a_{j+1} + ... + a_i)),
between chunks by a `lax.scan` that carries the state. The decay sums come from a
masked cumulative sum (never a difference of cumulative sums, which loses
precision and turns -inf into NaN). Documents of a packed row (`segment_ids`)
never see each other: the state is reset where the segment id changes. States
and decays are float32 whatever the input dtype; matmuls accumulate in float32.

Plain jnp, no Pallas: the oracle the kernels of this package are checked
against, and the 'xla' path of layers/ssm/ssd.py (which imports it from here).

Shapes (layers/__init__.py): b batch, t sequence, h heads, d head dim, N state
size, ng B/C groups (head h reads group h // (h/ng)), B chunk length, nb chunks.
"""

import jax
import jax.numpy as jnp


def document_index(segment_ids: jax.Array | None, shape: tuple[int, int],
                   initial_segment_ids: jax.Array | None = None) -> jax.Array:
  """int32 [b, t]: how many segment changes precede each token (0: the initial state's document).

  A token starts a new document where its segment id differs from the previous
  token's; the token before the first is `initial_segment_ids` [b] (None: the
  first token continues the initial state's document).
  """
  if segment_ids is None:
    return jnp.zeros(shape, jnp.int32)
  segment_ids = segment_ids.astype(jnp.int32)
  first = segment_ids[:, :1] if initial_segment_ids is None else (
      initial_segment_ids.astype(jnp.int32)[:, None])
  previous = jnp.concatenate([first, segment_ids[:, :-1]], axis=1)
  return jnp.cumsum(segment_ids != previous, axis=1, dtype=jnp.int32)


def _segsum(a: jax.Array) -> jax.Array:
  """[..., B] -> [..., B, B]: out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above it."""
  length = a.shape[-1]
  lower = jnp.tril(jnp.ones((length, length), bool), -1)  # i > j: a[i] enters the sum.
  terms = jnp.where(lower, a[..., :, None], 0.0)
  sums = jnp.cumsum(terms, axis=-2)
  causal = jnp.tril(jnp.ones((length, length), bool))
  return jnp.where(causal, sums, -jnp.inf)


def ssd(x: jax.Array, dt: jax.Array, a: jax.Array, bmat: jax.Array, cmat: jax.Array,
        d_skip: jax.Array, *, chunk_size: int, segment_ids: jax.Array | None = None,
        initial_state: jax.Array | None = None,
        initial_segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The SSD scan of a whole sequence, by chunks.

  Args:
    x: [b, t, h, d] inputs (any float dtype; the output has it).
    dt: [b, t, h] positive step sizes (already softplus-ed and clamped).
    a: [h] negative decay rates (A = -exp(A_log)).
    bmat: [b, t, ng, N] input matrix B (shared by the h/ng heads of a group).
    cmat: [b, t, ng, N] output matrix C.
    d_skip: [h] skip weights D.
    chunk_size: chunk length B; any t works (padded internally).
    segment_ids: int [b, t] or None; the state resets where the id changes.
    initial_state: float32 [b, h, d, N] or None (zeros): the state before token 0.
    initial_segment_ids: int [b] or None: the segment the initial state belongs
      to (None: the first token's).
  Returns:
    (y [b, t, h, d] in x.dtype, final state float32 [b, h, d, N] after token t-1).
  """
  b, t, h, d = x.shape
  ng, n = bmat.shape[2], bmat.shape[3]
  hg = h // ng
  chunk = min(chunk_size, t)
  nb = -(-t // chunk)
  pad = nb * chunk - t
  doc = document_index(segment_ids, (b, t), initial_segment_ids)
  dt = dt.astype(jnp.float32)
  if pad:
    widths = lambda z: [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2)  # noqa: E731
    # Padding adds nothing (dt 0: decay 1, no input) and stays in the last document.
    x, dt, bmat, cmat = (jnp.pad(z, widths(z)) for z in (x, dt, bmat, cmat))
    doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")
  compute = x.dtype
  # [b, nb, B, ng, hg, ...]: chunks, and heads split into their groups.
  xc = x.reshape(b, nb, chunk, ng, hg, d)
  dtc = dt.reshape(b, nb, chunk, ng, hg)
  bc = bmat.reshape(b, nb, chunk, ng, n)
  cc = cmat.reshape(b, nb, chunk, ng, n)
  docc = doc.reshape(b, nb, chunk)
  x_dt = (xc.astype(jnp.float32) * dtc[..., None]).astype(compute)
  log_decay = jnp.moveaxis(dtc * a.astype(jnp.float32).reshape(ng, hg), 2, -1)  # [b,nb,ng,hg,B]
  segsum = _segsum(log_decay)  # [b, nb, ng, hg, B, B]
  same_doc = docc[..., :, None] == docc[..., None, :]  # [b, nb, B, B]

  # 1. Within each chunk: masked "attention" C_i·B_j · exp(segsum[i, j]).
  scores = jnp.einsum("bclgn,bcsgn->bcgls", cc, bc, preferred_element_type=jnp.float32)
  weights = jnp.exp(segsum) * scores[:, :, :, None] * same_doc[:, :, None, None]
  y_diag = jnp.einsum("bcgjls,bcsgjd->bclgjd", weights.astype(compute), x_dt,
                      preferred_element_type=jnp.float32)

  # 2. Each chunk's own contribution to the state at its end (tokens of its last document).
  to_end = jnp.exp(segsum[..., -1, :])  # [b, nb, ng, hg, B]
  to_end = to_end * (docc == docc[..., -1:])[:, :, None, None]
  chunk_states = jnp.einsum("bcsgn,bcgjs,bcsgjd->bcgjdn", bc, to_end.astype(compute), x_dt,
                            preferred_element_type=jnp.float32)

  # 3. Between chunks: carry the state; it survives a chunk only if no document ends inside.
  chunk_decay = jnp.exp(segsum[..., -1, 0] + log_decay[..., 0])  # all of the chunk's decay
  doc_before = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), docc[:, :-1, -1]], axis=1)
  survives = docc[:, :, -1] == doc_before  # [b, nb]
  state0 = (jnp.zeros((b, h, d, n), jnp.float32) if initial_state is None
            else initial_state.astype(jnp.float32)).reshape(b, ng, hg, d, n)

  def step(state, inputs):
    decay, keep, own = inputs  # [b, ng, hg], [b], [b, ng, hg, d, n]
    new = state * (decay * keep[:, None, None])[..., None, None] + own
    return new, state

  final, states_before = jax.lax.scan(
      step, state0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(survives, 1, 0),
                     jnp.moveaxis(chunk_states, 1, 0)))
  states_before = jnp.moveaxis(states_before, 0, 1)  # [b, nb, ng, hg, d, N]

  # 4. The carried state read out by each token of its own document.
  from_start = jnp.exp(jnp.cumsum(log_decay, axis=-1))  # [b, nb, ng, hg, B]
  from_start = from_start * (docc == doc_before[..., None])[:, :, None, None]
  y_off = jnp.einsum("bclgn,bcgjdn,bcgjl->bclgjd", cc.astype(jnp.float32), states_before,
                     from_start, preferred_element_type=jnp.float32)

  y = (y_diag + y_off).reshape(b, nb * chunk, h, d)[:, :t]
  y = y + x[:, :t].astype(jnp.float32) * d_skip.astype(jnp.float32)[:, None]
  return y.astype(compute), final.reshape(b, h, d, n)
