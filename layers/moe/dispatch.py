"""Expert computation for routed tokens: dropless (sort + grouped matmul) and capacity.

Pure functions, no Flax. Every expert is a SwiGLU: down(silu(x @ gate) * (x @ up)).

Shapes: see layers/__init__.py (here b, t, n, e, m, E, K, a = n * K, C). Expert
weights: gate/up [E, e, m], down [E, m, e].

The grouped matmul (grouped_matmul.py: `jax.lax.ragged_dot` on GPU and
TPU, expert-tiled einsums on CPU, where ragged_dot is ~8x slower) multiplies
row block i (rows sum(sizes[:i]) .. sum(sizes[:i+1])) by expert i's weights;
rows past sum(group_sizes) come out as zeros and get zero gradient (checked on
jax 0.10.2), which the expert-parallel path relies on for its padding rows.

Capacity groups: the capacity functions count C slots per expert per row of
[b, t, ...] inputs (one group per sequence, as GShard's groups), so which
assignments are dropped never depends on how the batch is sharded.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from layers.moe.grouped_matmul import swiglu_grouped


def swiglu_batched(buffers: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """Per-expert row buffers [E, rows, e] -> [E, rows, e]; expert i's weights on buffers[i]."""
  h = jax.nn.silu(jnp.einsum("xne,xem->xnm", buffers, gate))
  h = checkpoint_name(h * jnp.einsum("xne,xem->xnm", buffers, up), "moe_hidden")
  return jnp.einsum("xnm,xme->xne", h, down)


class SortedAssignments(NamedTuple):
  """Assignments (token, choice) sorted by expert.

  Attributes:
    order: [a] int32 flat assignment index (token * K + choice) of each sorted row.
    group_sizes: [E] int32 assignments per expert.
    experts: [a] int32 expert of each sorted row.
  """
  order: jax.Array
  group_sizes: jax.Array
  experts: jax.Array


def sort_assignments(indices: jax.Array, num_experts: int) -> SortedAssignments:
  """indices [n, K] -> assignments sorted (stably) by expert.

  Expert ids equal to `num_experts` mark assignments to skip: they sort last
  and are not counted in group_sizes.
  """
  flat = indices.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1, mode="drop")
  return SortedAssignments(order, group_sizes, flat[order])


def inverse_permutation(order: jax.Array) -> jax.Array:
  """The permutation that undoes `x[order]`."""
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def combine(expert_out: jax.Array, weights: jax.Array, dtype) -> jax.Array:
  """expert_out [n, K, e] weighted by weights [n, K] -> [n, e] in dtype (float32 sum)."""
  out = jnp.einsum("nke,nk->ne", expert_out.astype(jnp.float32), weights.astype(jnp.float32))
  return out.astype(dtype)


def dropless(x: jax.Array, weights: jax.Array, indices: jax.Array, gate: jax.Array,
             up: jax.Array, down: jax.Array) -> jax.Array:
  """Every assignment computed: x [n, e], weights/indices [n, K] -> [n, e].

  Sorts the n*K assignments by expert, gathers their rows, runs three grouped
  matmuls (grouped_matmul) and scatters the results back. Differentiable in x,
  weights and the expert weights.
  """
  n, top_k = indices.shape
  sa = sort_assignments(indices, gate.shape[0])
  xs = x[sa.order // top_k]  # [a, e]
  ys = swiglu_grouped(xs, gate, up, down, sa.group_sizes)
  y = ys[inverse_permutation(sa.order)].reshape(n, top_k, -1)
  return combine(y, weights, x.dtype)


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """C, slots per expert for a group of `num_tokens` tokens (at least 1).

  C = ceil(capacity_factor * num_tokens * K / E) with K = top_k.
  """
  if capacity_factor <= 0:
    raise ValueError(f"model.moe.capacity_factor={capacity_factor} must be > 0.")
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


class Slots(NamedTuple):
  """Where each assignment lands in its expert's buffer.

  Attributes:
    slot: [b, t, K] int32 flat slot expert * C + position, or E * C (the
      overflow slot) for dropped and masked assignments.
    kept: [b, t, K] bool assignments that got a slot.
    dropped: [] int32 assignments of real tokens that found their expert full.
  """
  slot: jax.Array
  kept: jax.Array
  dropped: jax.Array


def capacity_slots(indices: jax.Array, token_mask: jax.Array | None, num_experts: int,
                   cap: int) -> Slots:
  """Queue positions per (row, expert); indices [b, t, K], token_mask [b, t] bool or None.

  Order within a row: all first choices in token order, then all second
  choices, ... (Switch / GShard), so a token's top choice is dropped last.
  Masked (padding) tokens take no slot and are not counted as dropped.
  """
  b, t, top_k = indices.shape
  valid = jnp.ones((b, t), bool) if token_mask is None else token_mask.astype(bool)
  onehot = jax.nn.one_hot(indices, num_experts, dtype=jnp.int32)  # [b, t, K, E]
  onehot = onehot * valid[:, :, None, None]
  queue = jnp.swapaxes(onehot, 1, 2).reshape(b, top_k * t, num_experts)  # choice-major
  position = jnp.cumsum(queue, axis=1) - 1
  position = jnp.sum(position * queue, axis=-1).reshape(b, top_k, t).swapaxes(1, 2)  # [b, t, K]
  routed = valid[:, :, None] & jnp.ones((1, 1, top_k), bool)
  kept = routed & (position < cap)
  slot = jnp.where(kept, indices * cap + position, num_experts * cap).astype(jnp.int32)
  dropped = jnp.sum(routed & ~kept).astype(jnp.int32)
  return Slots(slot, kept, dropped)


def dispatch(x: jax.Array, slot: jax.Array, num_slots: int) -> jax.Array:
  """Fills expert buffers: x [b, t, e], slot [b, t, K] -> [b, num_slots, e] (empty slots zero).

  Written as a gather (each slot reads its token), so the backward pass is a
  scatter-add of slot gradients back onto tokens.
  """
  b, t, top_k = slot.shape
  token = jnp.full((b, num_slots + 1), t, jnp.int32)
  token = token.at[jnp.arange(b)[:, None], slot.reshape(b, t * top_k)].set(
      jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, top_k)).reshape(1, t * top_k))
  padded = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)  # row t is zeros
  return jnp.take_along_axis(padded, token[:, :num_slots, None], axis=1)


def gather_slots(buffers: jax.Array, slot: jax.Array) -> jax.Array:
  """Reads each assignment's result: buffers [b, num_slots, e], slot [b, t, K] -> [b, t, K, e].

  The overflow slot (num_slots) reads zeros.
  """
  b, t, top_k = slot.shape
  padded = jnp.concatenate([buffers, jnp.zeros_like(buffers[:, :1])], axis=1)
  return jnp.take_along_axis(padded, slot.reshape(b, t * top_k, 1), axis=1).reshape(b, t, top_k, -1)


def capacity_experts(x: jax.Array, weights: jax.Array, slot: jax.Array, gate: jax.Array,
                     up: jax.Array, down: jax.Array, cap: int) -> jax.Array:
  """Experts on fixed buffers: x [b, t, e], weights [b, t, K], slot [b, t, K] (capacity_slots) -> [b, t, e]."""
  b, t, top_k = slot.shape
  num_experts = gate.shape[0]
  buffers = dispatch(x, slot, num_experts * cap)  # [b, E * C, e]
  buffers = to_expert_major(buffers, num_experts)
  out = from_expert_major(swiglu_batched(buffers, gate, up, down), b)
  y = gather_slots(out, slot)
  y = combine(y.reshape(b * t, top_k, -1), weights.reshape(b * t, top_k), x.dtype)
  return y.reshape(b, t, -1)


def to_expert_major(buffers: jax.Array, num_experts: int) -> jax.Array:
  """[b, E * C, e] -> [E, b * C, e]."""
  b, slots, e = buffers.shape
  cap = slots // num_experts
  return buffers.reshape(b, num_experts, cap, e).swapaxes(0, 1).reshape(num_experts, b * cap, e)


def from_expert_major(buffers: jax.Array, b: int) -> jax.Array:
  """[E, b * C, e] -> [b, E * C, e]; the inverse of to_expert_major."""
  num_experts, rows, e = buffers.shape
  cap = rows // b
  return buffers.reshape(num_experts, b, cap, e).swapaxes(0, 1).reshape(b, num_experts * cap, e)


def capacity_dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array, gate: jax.Array,
                      up: jax.Array, down: jax.Array, *, capacity_factor: float,
                      token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Fixed-capacity experts per row: x [b, t, e], weights/indices [b, t, K] -> ([b, t, e], dropped []).

  C = capacity(t, K, E, capacity_factor) slots per expert per row;
  assignments past C (see capacity_slots for the order) contribute zero, so
  their token keeps only its residual. `dropped` counts them (int32).
  """
  num_experts = gate.shape[0]
  cap = capacity(indices.shape[1], indices.shape[2], num_experts, capacity_factor)
  slots = capacity_slots(indices, token_mask, num_experts, cap)
  return capacity_experts(x, weights, slots.slot, gate, up, down, cap), slots.dropped
