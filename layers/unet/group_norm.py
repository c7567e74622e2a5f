"""Group normalisation over the channels of NHWC images (torch's GroupNorm, affine).

Shapes: b batch, H height, W width, c channels.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class GroupNorm(nn.Module):
  """Normalises each of `num_groups` channel groups over (H, W, c / num_groups), in float32.

  Parameters: scale [c] (ones), bias [c] (zeros). The variance is the biased
  one, as in torch.

  Attributes:
    num_groups: groups the channels split into; divides c.
    eps: added to the variance (diffusers' UNet2DModel: norm_eps).
    dtype: output dtype.
    param_dtype: parameter storage dtype.
  """
  num_groups: int
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [b, H, W, c] -> [b, H, W, c] in `dtype`."""
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm {self.name!r}: {c} channels do not split into "
                       f"{self.num_groups} groups.")
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("channels",)),
                       (c,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("channels",)), (c,), self.param_dtype)
    # Per-channel means over (H, W) first, then over each group's channels: the same
    # values as reducing a [b, H·W, groups, c / groups] view, 5-7x as fast on XLA:CPU
    # (forward + backward), where the strided reduction is slow.
    x32 = x.astype(jnp.float32)
    spatial = tuple(range(1, x.ndim - 1))
    mean = self._per_channel_group_mean(jnp.mean(x32, axis=spatial))
    centered = x32 - mean
    var = self._per_channel_group_mean(jnp.mean(jnp.square(centered), axis=spatial))
    normed = centered * jax.lax.rsqrt(var + self.eps)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)

  def _per_channel_group_mean(self, stats: jax.Array) -> jax.Array:
    """[b, c] per-channel statistics -> their group means, [b, 1, 1, c] (per channel)."""
    b, c = stats.shape
    grouped = jnp.mean(stats.reshape(b, self.num_groups, c // self.num_groups), axis=-1,
                       keepdims=True)
    per_channel = jnp.broadcast_to(grouped, (b, self.num_groups, c // self.num_groups))
    return per_channel.reshape(b, 1, 1, c)
