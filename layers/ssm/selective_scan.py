"""The Mamba-1 selective scan (Gu & Dao 2023, arXiv 2312.00752), parallel over each chunk.

Each inner channel i keeps its own state h [N] with its own decay rates A[i] [N]:

    h_t = exp(dt_t · A) ∘ h_{t-1} + dt_t · x_t · B_t        y_t = h_t · C_t + D · x_t

(dt_t, x_t per channel; B_t, C_t [N] shared by the channels of a token). The decay
differs per (channel, state) pair, so unlike Mamba-2's SSD there is no matmul
form; the recurrence is a first-order linear one, solved here by
`lax.associative_scan` over the tokens of a chunk (pairs (decay, input) combine
as (a1·a2, a2·u1 + u2)), with a `lax.scan` carrying the state from chunk to
chunk. The chunk body is rematerialised, so training keeps one [i, N] state per
chunk (not per token) for the backward pass. Measured on CPU (forward + backward,
b=2, t=1024, i=256, N=16): chunks of 8 to 32 tokens take 130-180 ms and ~20 MiB
of temporaries; one associative scan over the whole row 920 ms and 494 MiB (its
levels materialise [t, i, N] several times: at mamba-130m's i = 1536 that is
100 MB per 1k-token row and layer, each); a token-by-token `lax.scan` 250 ms and
140 MiB (it saves every state for the backward pass). Short chunks win on both
counts on CPU; on accelerators longer chunks trade memory for fewer sequential
steps (`chunk_size`).

Documents of a packed row never see each other: the decay is 0 on the first
token of a document. Products of decays are taken directly (each in (0, 1]),
never as exp of a difference of cumulative sums, so nothing overflows.
States, decays and the readout are float32 whatever the input dtype.

Plain jnp, no Pallas. Shapes (layers/__init__.py): b batch, t sequence,
i inner width (the scan's channels), N state size, B chunk length, nb chunks.
"""

import jax
import jax.numpy as jnp

from layers.ssm.ssd import document_index


def _combine(left, right):
  """Composes two spans of the recurrence: apply `left`, then `right`."""
  decay_l, input_l = left
  decay_r, input_r = right
  return decay_l * decay_r, decay_r * input_l + input_r


def _chunk(state, inputs, a):
  """One chunk: state [b, i, N] and its B tokens -> (state after them, y [b, B, i])."""
  x, dt, bmat, cmat, keep = inputs  # [b,B,i], [b,B,i], [b,B,N], [b,B,N], [b,B]
  decay = jnp.exp(dt[..., None] * a) * keep[:, :, None, None]  # [b, B, i, N]
  update = (dt * x)[..., None] * bmat[:, :, None, :]  # [b, B, i, N]
  update = update.at[:, 0].add(decay[:, 0] * state)  # The carried state enters at token 0.
  _, states = jax.lax.associative_scan(_combine, (decay, update), axis=1)
  y = jnp.einsum("bliN,blN->bli", states, cmat, preferred_element_type=jnp.float32)
  return states[:, -1], y


def selective_scan(x: jax.Array, dt: jax.Array, a: jax.Array, bmat: jax.Array,
                   cmat: jax.Array, d_skip: jax.Array, *, chunk_size: int = 32,
                   segment_ids: jax.Array | None = None,
                   initial_state: jax.Array | None = None,
                   initial_segment_ids: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """The selective scan of a whole sequence.

  Args:
    x: [b, t, i] inputs (any float dtype; the output has it).
    dt: [b, t, i] positive step sizes (already softplus-ed).
    a: [i, N] negative decay rates (A = -exp(A_log)).
    bmat: [b, t, N] input matrix B of each token.
    cmat: [b, t, N] output matrix C of each token.
    d_skip: [i] skip weights D.
    chunk_size: tokens per associative scan (B; computation only, any t works).
    segment_ids: int [b, t] or None; the state resets where the id changes.
    initial_state: float32 [b, i, N] or None (zeros): the state before token 0.
    initial_segment_ids: int [b] or None: the segment the initial state belongs
      to (None: the first token's).
  Returns:
    (y [b, t, i] in x.dtype, final state float32 [b, i, N] after token t-1).
  """
  b, t, i = x.shape
  n = a.shape[-1]
  chunk = max(1, min(chunk_size, t))
  nb = -(-t // chunk)
  pad = nb * chunk - t
  doc = document_index(segment_ids, (b, t), initial_segment_ids)
  doc_before = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), doc[:, :-1]], axis=1)
  keep = (doc == doc_before).astype(jnp.float32)  # 0 where a document starts.
  f32 = lambda z: z.astype(jnp.float32)  # noqa: E731
  inputs = (f32(x), f32(dt), f32(bmat), f32(cmat), keep)
  if pad:  # Padding tokens have dt 0 and keep 1: decay 1, no input; the state passes through.
    widths = lambda z: [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2)  # noqa: E731
    inputs = tuple(jnp.pad(z, widths(z), constant_values=float(z is keep)) for z in inputs)
  # [nb, b, B, ...]: the chunk axis leads for lax.scan.
  inputs = tuple(jnp.moveaxis(z.reshape((b, nb, chunk) + z.shape[2:]), 1, 0) for z in inputs)
  state = (jnp.zeros((b, i, n), jnp.float32) if initial_state is None
           else f32(initial_state))
  body = jax.checkpoint(lambda s, z: _chunk(s, z, f32(a)))
  final, y = jax.lax.scan(body, state, inputs)
  y = jnp.moveaxis(y, 0, 1).reshape(b, nb * chunk, i)[:, :t]
  y = y + f32(x) * f32(d_skip)
  return y.astype(x.dtype), final
