"""Gated feed-forward block (Shazeer, 2020): down(act(gate(x)) * up(x)).

act is SiLU for SwiGLU (Llama, Qwen, Mistral) or tanh-approximated GELU for
GeGLU (Gemma).

Shapes: b batch, t sequence, e embed, m mlp hidden.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from layers.linear import Einsum


ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: nn.gelu(x, approximate=True)}


class SwiGLU(nn.Module):
  """Gated MLP, no biases: SwiGLU by default, GeGLU with activation='gelu_tanh'.

  Attributes:
    hidden_dim: width m of the gated hidden layer.
    activation: a key of ACTIVATIONS, applied to the gate.
    dtype: computation dtype.
    param_dtype: parameter storage dtype.
  """
  hidden_dim: int
  activation: str = "silu"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [b, t, e] -> [b, t, e]."""
    e, m = x.shape[-1], self.hidden_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Einsum((e, m), ("embed", "mlp"), "bte,em->btm", name="gate", **kw)(x)
    up = Einsum((e, m), ("embed", "mlp"), "bte,em->btm", name="up", **kw)(x)
    hidden = ACTIVATIONS[self.activation](gate) * up
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    hidden = checkpoint_name(hidden, "mlp_hidden")
    return Einsum((m, e), ("mlp", "embed"), "btm,me->bte", name="down", **kw)(hidden)
