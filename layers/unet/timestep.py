"""Timestep features: diffusers' sinusoidal `get_timestep_embedding` and its 2-layer MLP.

Shapes: b batch; c the sinusoid width (block_out_channels[0]); the MLP widens it
to its `embed_dim` (4·c in UNet2DModel).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.linear import Einsum


def sinusoidal_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                         freq_shift: float, max_period: float = 10_000.0) -> jax.Array:
  """Float32 [b, dim] features of timesteps [b] (int or float, fractional allowed).

  Frequency k of the dim // 2 is exp(-ln(max_period) · k / (dim // 2 - freq_shift));
  the features are [sin | cos] of timestep · frequency, [cos | sin] when
  `flip_sin_to_cos`, zero-padded by one column when `dim` is odd (the DDPM
  paper's embedding has freq_shift 1; diffusers' Timesteps defaults are flip
  True, shift 0).
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  parts = [jnp.cos(angles), jnp.sin(angles)] if flip_sin_to_cos else [jnp.sin(angles),
                                                                      jnp.cos(angles)]
  features = jnp.concatenate(parts, axis=-1)
  if dim % 2:
    features = jnp.pad(features, ((0, 0), (0, 1)))
  return features


class TimestepEmbedding(nn.Module):
  """linear_2(silu(linear_1(features))): [b, c] -> [b, embed_dim] (diffusers' TimestepEmbedding).

  Parameters: linear_1/kernel [c, embed_dim], linear_2/kernel [embed_dim,
  embed_dim], each with a bias.

  Attributes:
    embed_dim: output width (4·block_out_channels[0] in UNet2DModel).
    dtype: computation dtype.
    param_dtype: parameter storage dtype.
  """
  embed_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    kw = dict(bias_axes=("channels",), dtype=self.dtype, param_dtype=self.param_dtype)
    c, e = features.shape[-1], self.embed_dim
    x = Einsum((c, e), ("channels_in", "channels"), "bc,ce->be", name="linear_1", **kw)(features)
    x = nn.silu(x)
    return Einsum((e, e), ("channels_in", "channels"), "bc,ce->be", name="linear_2", **kw)(x)
