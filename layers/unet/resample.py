"""Halving and doubling the resolution of NHWC feature maps (diffusers' Downsample2D, Upsample2D).

Shapes: b batch, H height, W width, c channels.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.unet.conv import Conv2D


class Downsample2D(nn.Module):
  """A 3x3 conv of stride 2: [b, H, W, c] -> [b, H/2, W/2, c].

  Parameters: conv/kernel [3, 3, c, c], conv/bias [c].

  Attributes:
    padding: diffusers' `downsample_padding`: 1 pads one pixel on every side;
      0 pads one pixel at the bottom and the right only (the DDPM original).
    dtype: computation dtype.
    param_dtype: parameter storage dtype.
  """
  padding: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.padding not in (0, 1):
      raise ValueError(f"Downsample2D: padding={self.padding}; diffusers uses 0 or 1.")
    pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
    return Conv2D(x.shape[-1], strides=(2, 2), padding=pad, name="conv", dtype=self.dtype,
                  param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2 then a 3x3 conv: [b, H, W, c] -> [b, 2H, 2W, c].

  Parameters: conv/kernel [3, 3, c, c], conv/bias [c].

  Attributes:
    dtype: computation dtype.
    param_dtype: parameter storage dtype.
  """
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return Conv2D(c, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
