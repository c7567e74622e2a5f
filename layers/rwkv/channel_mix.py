"""The RWKV-7 channel mix: token shift, then relu(x_k K)² V with K four times wide.

Shapes (layers/__init__.py): b batch, t sequence, e embed, m hidden width (4·e).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.linear import Einsum
from layers.rwkv import initializers as rwkv_init
from layers.rwkv.token_shift import token_shift


class ChannelMix(nn.Module):
  """x + (x' − x)·μ_k → relu(· K)² → V, with x' the previous token.

  Parameters: x_k [e]; key/kernel [e, m]; value/kernel [m, e].

  Attributes:
    hidden_dim: m (4·e in the published models).
    num_layers: L, for the depth-dependent initial lerp.
    dtype: computation dtype.
    param_dtype: parameter storage dtype.
  """
  hidden_dim: int
  num_layers: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, doc: jax.Array | None = None,
               previous: jax.Array | None = None,
               depth: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """x [b, t, e] -> (out [b, t, e], the last token [b, e]); doc and previous as
    in layers.rwkv.token_shift; depth (l in 0..L-1) sets the initial values only."""
    e = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shifted, last = token_shift(x, doc, previous)
    mu = self.param("x_k", nn.with_logical_partitioning(
        rwkv_init.channel_mix_lerp(depth, self.num_layers), ("embed",)), (e,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mixed = (x32 + (shifted.astype(jnp.float32) - x32) * mu.astype(jnp.float32))
    hidden = Einsum((e, self.hidden_dim), ("embed", "mlp"), "bte,em->btm", name="key",
                    kernel_init=rwkv_init.orthogonal(1.0), **kw)(mixed.astype(self.dtype))
    hidden = jnp.square(jax.nn.relu(hidden))
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    out = Einsum((self.hidden_dim, e), ("mlp", "embed"), "btm,me->bte", name="value",
                 kernel_init=nn.initializers.zeros_init(), **kw)(hidden)
    return out, last
