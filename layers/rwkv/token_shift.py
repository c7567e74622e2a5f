"""RWKV token shift: each token sees the previous token of its own document.

Shapes (layers/__init__.py): b batch, t sequence, e embed.
"""

import jax
import jax.numpy as jnp


def token_shift(x: jax.Array, doc: jax.Array | None = None,
                previous: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """x [b, t, e] -> (x_prev [b, t, e], the last token [b, e]).

  x_prev[t] = x[t-1], or zeros where token t starts a document (doc changes);
  token 0 sees `previous` [b, e] (the previous call's last token, decoding)
  where doc[:, 0] == 0, zeros otherwise.

  Args:
    x: the normed residual stream.
    doc: int [b, t] document index (layers.ssm.document_index); None: one document.
    previous: [b, e] the token before x[:, 0]; None: zeros.
  """
  batch, _, e = x.shape
  if previous is None:
    previous = jnp.zeros((batch, e), x.dtype)
  shifted = jnp.concatenate([previous.astype(x.dtype)[:, None], x[:, :-1]], axis=1)
  if doc is not None:
    doc_before = jnp.concatenate([jnp.zeros((batch, 1), doc.dtype), doc[:, :-1]], axis=1)
    shifted = jnp.where((doc == doc_before)[..., None], shifted, jnp.zeros_like(shifted))
  return shifted, x[:, -1]
