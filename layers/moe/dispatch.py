"""Expert computation for routed tokens: dropless (sort + grouped matmul) and capacity.

Pure functions, no Flax. Every expert is a SwiGLU: down(silu(x @ gate) * (x @ up)).

Shapes: n tokens, e embed, m expert hidden, E experts, k experts per token,
a = n * k assignments, g capacity groups, s tokens per group, C capacity (slots
per expert per group). Expert weights: gate/up [E, e, m], down [E, m, e].

The grouped matmul (grouped_matmul.py: `jax.lax.ragged_dot` on GPU and
TPU, expert-tiled einsums on CPU, where ragged_dot is ~8x slower) multiplies
row block i (rows sum(sizes[:i]) .. sum(sizes[:i+1])) by expert i's weights;
rows past sum(group_sizes) come out as zeros and get zero gradient (checked on
jax 0.10.2), which the expert-parallel path relies on for its padding rows.

Capacity groups: the MoE layer passes one group per sequence (g = b, s = t),
as GShard's groups, so which assignments are dropped never depends on how
the batch is sharded.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from layers.moe.grouped_matmul import swiglu_grouped


def swiglu_batched(buffers: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """Per-expert buffers [E, N, e] -> [E, N, e]; expert i's weights on buffers[i]."""
  h = jax.nn.silu(jnp.einsum("xne,xem->xnm", buffers, gate))
  h = checkpoint_name(h * jnp.einsum("xne,xem->xnm", buffers, up), "moe_hidden")
  return jnp.einsum("xnm,xme->xne", h, down)


class SortedAssignments(NamedTuple):
  """Assignments (token, choice) sorted by expert.

  Attributes:
    order: [a] int32 flat assignment index (token * k + choice) of each sorted row.
    group_sizes: [E] int32 assignments per expert.
    experts: [a] int32 expert of each sorted row.
  """
  order: jax.Array
  group_sizes: jax.Array
  experts: jax.Array


def sort_assignments(indices: jax.Array, num_experts: int) -> SortedAssignments:
  """indices [n, k] -> assignments sorted (stably) by expert.

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
  """expert_out [n, k, e] weighted by weights [n, k] -> [n, e] in dtype (float32 sum)."""
  out = jnp.einsum("nke,nk->ne", expert_out.astype(jnp.float32), weights.astype(jnp.float32))
  return out.astype(dtype)


def dropless(x: jax.Array, weights: jax.Array, indices: jax.Array, gate: jax.Array,
             up: jax.Array, down: jax.Array) -> jax.Array:
  """Every assignment computed: x [n, e], weights/indices [n, k] -> [n, e].

  Sorts the n*k assignments by expert, gathers their rows, runs three grouped
  matmuls (grouped_matmul) and scatters the results back. Differentiable in x,
  weights and the expert weights.
  """
  n, k = indices.shape
  sa = sort_assignments(indices, gate.shape[0])
  xs = x[sa.order // k]  # [a, e]
  ys = swiglu_grouped(xs, gate, up, down, sa.group_sizes)
  y = ys[inverse_permutation(sa.order)].reshape(n, k, -1)
  return combine(y, weights, x.dtype)


def capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert for a group of `num_tokens` tokens: ceil(factor * n * k / E), at least 1."""
  if capacity_factor <= 0:
    raise ValueError(f"model.capacity_factor={capacity_factor} must be > 0.")
  return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


class Slots(NamedTuple):
  """Where each assignment lands in its expert's buffer.

  Attributes:
    slot: [g, s, k] int32 flat slot expert * C + position, or E * C (the
      overflow slot) for dropped and masked assignments.
    kept: [g, s, k] bool assignments that got a slot.
    dropped: [] int32 assignments of real tokens that found their expert full.
  """
  slot: jax.Array
  kept: jax.Array
  dropped: jax.Array


def capacity_slots(indices: jax.Array, token_mask: jax.Array | None, num_experts: int,
                   cap: int) -> Slots:
  """Queue positions per (group, expert); indices [g, s, k], token_mask [g, s] bool or None.

  Order within a group: all first choices in token order, then all second
  choices, ... (Switch / GShard), so a token's top choice is dropped last.
  Masked (padding) tokens take no slot and are not counted as dropped.
  """
  g, s, k = indices.shape
  valid = jnp.ones((g, s), bool) if token_mask is None else token_mask.astype(bool)
  onehot = jax.nn.one_hot(indices, num_experts, dtype=jnp.int32)  # [g, s, k, E]
  onehot = onehot * valid[:, :, None, None]
  queue = jnp.swapaxes(onehot, 1, 2).reshape(g, k * s, num_experts)  # choice-major
  position = jnp.cumsum(queue, axis=1) - 1
  position = jnp.sum(position * queue, axis=-1).reshape(g, k, s).swapaxes(1, 2)  # [g, s, k]
  routed = valid[:, :, None] & jnp.ones((1, 1, k), bool)
  kept = routed & (position < cap)
  slot = jnp.where(kept, indices * cap + position, num_experts * cap).astype(jnp.int32)
  dropped = jnp.sum(routed & ~kept).astype(jnp.int32)
  return Slots(slot, kept, dropped)


def dispatch(x: jax.Array, slot: jax.Array, num_slots: int) -> jax.Array:
  """Fills expert buffers: x [g, s, e], slot [g, s, k] -> [g, num_slots, e] (empty slots zero).

  Written as a gather (each slot reads its token), so the backward pass is a
  scatter-add of slot gradients back onto tokens.
  """
  g, s, k = slot.shape
  token = jnp.full((g, num_slots + 1), s, jnp.int32)
  token = token.at[jnp.arange(g)[:, None], slot.reshape(g, s * k)].set(
      jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, k)).reshape(1, s * k))
  padded = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)  # row s is zeros
  return jnp.take_along_axis(padded, token[:, :num_slots, None], axis=1)


def gather_slots(buffers: jax.Array, slot: jax.Array) -> jax.Array:
  """Reads each assignment's result: buffers [g, num_slots, e], slot [g, s, k] -> [g, s, k, e].

  The overflow slot (num_slots) reads zeros.
  """
  g, s, k = slot.shape
  padded = jnp.concatenate([buffers, jnp.zeros_like(buffers[:, :1])], axis=1)
  return jnp.take_along_axis(padded, slot.reshape(g, s * k, 1), axis=1).reshape(g, s, k, -1)


def capacity_experts(x: jax.Array, weights: jax.Array, slot: jax.Array, gate: jax.Array,
                     up: jax.Array, down: jax.Array, cap: int) -> jax.Array:
  """Experts on fixed buffers: x [g, s, e], weights [g, s, k], slot [g, s, k] (capacity_slots) -> [g, s, e]."""
  g, s, k = slot.shape
  num_experts = gate.shape[0]
  buffers = dispatch(x, slot, num_experts * cap)  # [g, E * C, e]
  buffers = to_expert_major(buffers, num_experts)
  out = from_expert_major(swiglu_batched(buffers, gate, up, down), g)
  y = gather_slots(out, slot)
  return combine(y.reshape(g * s, k, -1), weights.reshape(g * s, k), x.dtype).reshape(g, s, -1)


def to_expert_major(buffers: jax.Array, num_experts: int) -> jax.Array:
  """[g, E * C, e] -> [E, g * C, e]."""
  g, slots, e = buffers.shape
  cap = slots // num_experts
  return buffers.reshape(g, num_experts, cap, e).swapaxes(0, 1).reshape(num_experts, g * cap, e)


def from_expert_major(buffers: jax.Array, g: int) -> jax.Array:
  """[E, g * C, e] -> [g, E * C, e]; the inverse of to_expert_major."""
  num_experts, rows, e = buffers.shape
  cap = rows // g
  return buffers.reshape(num_experts, g, cap, e).swapaxes(0, 1).reshape(g, num_experts * cap, e)


def capacity_dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array, gate: jax.Array,
                      up: jax.Array, down: jax.Array, *, capacity_factor: float,
                      token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Fixed-capacity experts per group: x [g, s, e], weights/indices [g, s, k] -> ([g, s, e], dropped []).

  C = capacity(s, k, E, capacity_factor) slots per expert per group;
  assignments past C (see capacity_slots for the order) contribute zero, so
  their token keeps only its residual. `dropped` counts them (int32).
  """
  num_experts = gate.shape[0]
  cap = capacity(indices.shape[1], indices.shape[2], num_experts, capacity_factor)
  slots = capacity_slots(indices, token_mask, num_experts, cap)
  return capacity_experts(x, weights, slots.slot, gate, up, down, cap), slots.dropped
