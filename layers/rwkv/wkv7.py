"""The RWKV-7 WKV recurrence (a generalized delta rule with a vector decay), plain jnp.

Per head, with a state S [d, d] (value rows i, key columns j):

    S_t = S_{t-1} · diag(w_t) + (S_{t-1} · a_t) b_tᵀ + v_t k_tᵀ        y_t = S_t · r_t

RWKV-7 uses a = −k̂ (the normalised key) and b = k̂ · iclr (the in-context
learning rate), so (S a) bᵀ removes part of the value stored under k̂ before
v kᵀ writes the new one. Note that the removal term reads S_{t-1}, not the
decayed state. Documents of a packed row never see each other: the state is
reset to zero where the document index changes, and a decode call continues
from the previous call's state.

This is the model's `xla` path: a `lax.scan` over tokens, the state carried in
float32. It is exact but sequential (one [d, d] update per token); a chunked
matrix form (and a Pallas kernel) are the next steps of issue 13.

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
    removed = jnp.einsum("bhij,bhj->bhi", state, a_t)
    state = (state * w_t[:, :, None, :] + removed[..., None] * b_t[:, :, None, :]
             + v_t[..., None] * k_t[:, :, None, :])
    return state, jnp.einsum("bhij,bhj->bhi", state, r_t)

  state, y = jax.lax.scan(step, initial_state.astype(jnp.float32), inputs)
  return jnp.moveaxis(y, 0, 1).astype(r.dtype), state
