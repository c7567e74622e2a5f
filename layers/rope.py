"""Rotary position embedding in the rotate-half layout used by HF Llama.

Dimension i of a head is rotated together with dimension i + d/2 by the angle
position * theta^(-2i/d), for i < d/2.

Shapes: b batch, t sequence, h heads, d head dim.
"""

import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """Rotation angles, float32 [b, t, d/2], for integer `positions` [b, t]."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta ** exponents)
  return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates x [b, t, h, d] by `positions` [b, t]; computed in float32, returns x.dtype."""
  angles = rope_angles(positions, x.shape[-1], theta)[:, :, None, :]  # [b, t, 1, d/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)
