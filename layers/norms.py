"""RMSNorm (Zhang & Sennrich, 2019): x / rms(x) * scale, no mean, no bias; and LayerNorm.

Gemma stores RMSNorm weights as offsets from one (x / rms(x) * (1 + w)):
`RMSNorm(scale_plus_one=True)`.

Shapes: b batch, t sequence, e embed, d head dim.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis, computed in float32.

  Attributes:
    eps: added to the mean square before the reciprocal square root.
    scale_plus_one: multiply by 1 + scale (Gemma) instead of scale; the
      parameter then starts at zeros instead of ones.
    scale_axis: logical axis of `scale` ('embed'; 'head_dim' for per-head
      query/key norms).
    dtype: dtype of the output.
    param_dtype: dtype of the `scale` parameter.
  """
  eps: float = 1e-6
  scale_plus_one: bool = False
  scale_axis: str = "embed"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises `x` [..., e] (or [..., d]) over its last axis; same shape, in `dtype`."""
    init = nn.initializers.zeros_init() if self.scale_plus_one else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, (self.scale_axis,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = scale.astype(jnp.float32) + (1.0 if self.scale_plus_one else 0.0)
    return (normed * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """(x − mean) / sqrt(var + eps) · scale + bias over the last axis, in float32.

  Attributes:
    eps: added to the variance (torch's LayerNorm default is 1e-5).
    dtype: dtype of the output.
    param_dtype: dtype of `scale` (ones) and `bias` (zeros).
  """
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises `x` [..., e] and returns [..., e] in `dtype`."""
    e = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (e,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("embed",)), (e,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)
