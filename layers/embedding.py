"""Token embedding table, usable as the (tied) output projection.

Shapes: b batch, t sequence, e embed, v vocab.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class Embed(nn.Module):
  """A [v, e] lookup table.

  Attributes:
    vocab_size: number of rows v.
    embed_dim: row width e.
    dtype: dtype of looked-up embeddings (and of `attend`'s inputs).
    param_dtype: storage dtype of the table.
    embedding_init: initializer (key, shape, dtype) of the table; None: the
      variance-scaled normal below.
  """
  vocab_size: int
  embed_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  embedding_init: Callable[..., jax.Array] | None = None

  def setup(self):
    init = self.embedding_init or nn.initializers.variance_scaling(
        1.0, "fan_in", "normal", out_axis=0)
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
        (self.vocab_size, self.embed_dim), self.param_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Looks up int `tokens` [b, t] and returns [b, t, e] in `dtype`."""
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output projection: x [b, t, e] -> float32 logits [b, t, v]."""
    table = self.embedding.astype(self.dtype)
    return jnp.einsum("bte,ve->btv", x.astype(self.dtype), table,
                      preferred_element_type=jnp.float32)
