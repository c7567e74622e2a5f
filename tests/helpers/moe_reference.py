"""Plain-jnp Mixture-of-Experts oracle for testing layers/moe: every expert on every token.

No sorting, no buffers, nothing shared with layers/moe/dispatch.py: each expert's
SwiGLU runs on all n tokens and the routing weights pick the results.

Shapes: see layers/__init__.py (here n, e, m, E, K).
"""

import jax
import jax.numpy as jnp


def dense_reference(x: jax.Array, weights: jax.Array, indices: jax.Array, gate: jax.Array,
                    up: jax.Array, down: jax.Array) -> jax.Array:
  """Every expert on every token, masked by the routing weights: x [n, e] -> [n, e]."""
  num_experts = gate.shape[0]
  combine_weights = jnp.einsum("nk,nkx->nx", weights.astype(jnp.float32),
                               jax.nn.one_hot(indices, num_experts, dtype=jnp.float32))
  h = jax.nn.silu(jnp.einsum("ne,xem->xnm", x, gate)) * jnp.einsum("ne,xem->xnm", x, up)
  y = jnp.einsum("xnm,xme->xne", h, down)
  return jnp.einsum("xne,nx->ne", y.astype(jnp.float32), combine_weights).astype(x.dtype)
