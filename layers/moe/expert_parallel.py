"""Routed experts under a device mesh: per-shard dispatch with all-to-all over the expert axis.

Shapes: see layers/__init__.py (here b, t, e, m, E, K, C; X expert-parallel
shards, the size of the mesh axes 'expert' maps to; El = E / X experts per
shard; n local tokens, a = n * K local assignments; a prime marks a per-shard
size, as b').

Without a mesh (or a one-device mesh) the plain functions of dispatch.py run.
Under a mesh the expert computation runs per shard in `jax.shard_map`:

* tokens keep the sharding the logical rules give ('batch' over its mesh
  axes, 'length' over 'sequence' for dropless; capacity needs whole rows);
* expert weights are split over E by the 'expert' rule and over m by the
  'mlp' rule (partial down projections are summed with psum); their 'embed'
  dim is gathered by the in_specs (so fsdp-sharded weights work);
* if tokens are sharded over the expert axes (rules with batch ->
  (..., 'expert')), assignments travel to the shard owning their expert with
  `all_to_all` and come back with the reverse one; if tokens are replicated
  over them, each shard computes its own experts for all tokens and the
  results are summed with psum.

Dropless all-to-all uses padded buffers: each shard sends X buffers of `a`
rows (any one destination may receive all local assignments), so it holds
send + receive buffers of X * a * e elements each, X times the local
assignments, plus the grouped matmuls run over X * a rows of which only about
a are real (rows past the group sizes are zero). `jax.lax.ragged_all_to_all`
would avoid that, but XLA:CPU cannot run it in jax 0.10.2 ("HLO opcode
ragged-all-to-all is not supported"), so it is not used: no untested path.
Capacity all-to-all moves the [E, b_local * C, e] buffers, as GShard does.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from layers.moe import dispatch as md

IMPLS = ("dropless", "capacity")


def _mesh_axes(logical: str, size: int, mesh, exclude=()) -> tuple[str, ...]:
  """Mesh axes the logical axis maps to, or () when they do not divide `size` or overlap `exclude`."""
  spec = nn.logical_to_mesh_axes((logical,))[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  axes = tuple(a for a in axes if mesh.shape[a] > 1)
  if not axes or any(a in exclude for a in axes) or size % math.prod(mesh.shape[a] for a in axes):
    return ()
  return axes


def _spec_entry(axes: tuple[str, ...]):
  return axes if axes else None


def moe_experts(x: jax.Array, weights: jax.Array, indices: jax.Array, gate: jax.Array,
                up: jax.Array, down: jax.Array, *, impl: str, capacity_factor: float = 1.25,
                token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Routed SwiGLU experts: x [b, t, e], weights/indices [b, t, K] -> ([b, t, e], dropped []).

  impl 'dropless' computes every assignment (dropped = 0); 'capacity' gives
  each expert C = capacity(t, K, E, capacity_factor) slots per sequence
  (dispatch.capacity_slots), so results do not depend on the batch
  sharding. gate/up [E, e, m], down [E, m, e]; weights float32.

  Raises:
    ValueError: naming model.moe.impl, model.moe.capacity_factor or
      model.moe.num_experts (not divisible by the expert mesh axes).
  """
  if impl not in IMPLS:
    raise ValueError(f"model.moe.impl={impl!r}; choose one of {IMPLS}.")
  b, t, top_k = indices.shape
  num_experts = gate.shape[0]
  slots = cap = None
  dropped = jnp.zeros((), jnp.int32)
  if impl == "capacity":
    cap = md.capacity(t, top_k, num_experts, capacity_factor)
    slots = md.capacity_slots(indices, token_mask, num_experts, cap)
    dropped = slots.dropped

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    if impl == "dropless":
      y = md.dropless(x.reshape(b * t, -1), weights.reshape(b * t, top_k),
                      indices.reshape(b * t, top_k), gate, up, down)
      return y.reshape(x.shape), dropped
    return md.capacity_experts(x, weights, slots.slot, gate, up, down, cap), dropped

  batch_axes = _mesh_axes("batch", b, mesh)
  length_axes = _mesh_axes("length", t, mesh, exclude=batch_axes) if impl == "dropless" else ()
  token_axes = batch_axes + length_axes
  spec = nn.logical_to_mesh_axes(("expert",))[0]
  ep_axes = tuple(a for a in ((spec,) if isinstance(spec, str) else tuple(spec or ()))
                  if mesh.shape[a] > 1)
  ep = math.prod(mesh.shape[a] for a in ep_axes)
  if num_experts % ep:
    raise ValueError(f"model.moe.num_experts={num_experts} must be divisible by the {ep} expert-"
                     f"parallel shards (mesh axes {ep_axes}).")
  exchange = bool(ep_axes) and all(a in token_axes for a in ep_axes)
  if ep_axes and not exchange and any(a in token_axes for a in ep_axes):
    raise ValueError(f"logical_axis_rules: tokens are sharded over only part of the expert "
                     f"mesh axes {ep_axes}; shard 'batch' over all of them or none.")
  mlp_axes = _mesh_axes("mlp", gate.shape[-1], mesh, exclude=token_axes + ep_axes)

  tok = P(_spec_entry(batch_axes), _spec_entry(length_axes))
  w_in = P(_spec_entry(ep_axes), None, _spec_entry(mlp_axes))
  w_out = P(_spec_entry(ep_axes), _spec_entry(mlp_axes), None)
  ctx = dict(ep_axes=ep_axes, ep=ep, exchange=exchange, mlp_axes=mlp_axes)
  if impl == "dropless":
    fn = lambda *a: _dropless_shard(*a, **ctx)
    args = (x, weights, indices)
  else:
    fn = lambda *a: _capacity_shard(*a, cap=cap, **ctx)
    args = (x, weights, slots.slot)
  y = jax.shard_map(fn, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out),
                    out_specs=tok)(*args, gate, up, down)
  return y, dropped


def _local_expert_offset(ep_axes, num_local: int) -> jax.Array:
  """First expert id owned by this shard."""
  return jax.lax.axis_index(ep_axes) * num_local if ep_axes else jnp.zeros((), jnp.int32)


def _finish(partial_out: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  return jax.lax.psum(partial_out, axes) if axes else partial_out


def _dropless_shard(x, weights, indices, gate, up, down, *, ep_axes, ep, exchange, mlp_axes):
  """Per-shard dropless experts. x [b', t', e], weights/indices [b', t', K], gate [El, e, m'] ..."""
  bl, tl, top_k = indices.shape
  n, a, num_local = bl * tl, bl * tl * top_k, gate.shape[0]
  x2, w2, idx = x.reshape(n, -1), weights.reshape(n, top_k), indices.reshape(n, top_k)
  if not exchange:  # Tokens replicated over the expert axes (or none): my experts, then psum.
    local = idx - _local_expert_offset(ep_axes, num_local)
    local = jnp.where((local >= 0) & (local < num_local), local, num_local)
    sa = md.sort_assignments(local, num_local)
    # jax 0.10.2: argsort of an array varying over ep_axes returns indices typed
    # as invariant, so x2[order] would be too and its gradient would miss the
    # psum over ep_axes. Marking x2 varying first keeps the gradient right.
    x2 = jax.lax.pcast(x2, ep_axes, to="varying") if ep_axes else x2
    ys = md.swiglu_grouped(x2[sa.order // top_k], gate, up, down, sa.group_sizes)
    ys = _finish(ys, mlp_axes)
    y = md.combine(ys[md.inverse_permutation(sa.order)].reshape(n, top_k, -1), w2, x.dtype)
    return _finish(y, ep_axes).reshape(x.shape)

  # 1. Sort local assignments by expert; destination shard = expert // El.
  sa = md.sort_assignments(idx, num_local * ep)
  dest = sa.experts // num_local  # [a], nondecreasing
  send_counts = jnp.zeros((ep,), jnp.int32).at[dest].add(1)
  starts = jnp.cumsum(send_counts) - send_counts  # [X]
  # 2. Padded send buffers [X, a, e]: row p of buffer j is sorted row starts[j] + p.
  pos = jnp.arange(a, dtype=jnp.int32)
  src = starts[:, None] + pos[None, :]  # [X, a]
  live = pos[None, :] < send_counts[:, None]
  xs = jnp.concatenate([x2[sa.order // top_k], jnp.zeros_like(x2[:1])])  # row a is zeros
  send = xs[jnp.where(live, src, a)]  # [X, a, e]
  send_ids = jnp.where(live, sa.experts[jnp.minimum(src, a - 1)] % num_local, num_local)
  # 3. Exchange: recv[i] holds what shard i sent me (ids are local, El marks padding).
  recv = jax.lax.all_to_all(send, ep_axes, 0, 0, tiled=True)
  recv_ids = jax.lax.all_to_all(send_ids, ep_axes, 0, 0, tiled=True)
  # 4. My experts on the received rows (padding sorts last, comes out zero).
  rsa = md.sort_assignments(recv_ids.reshape(-1, 1), num_local)
  rows = recv.reshape(ep * a, -1)[rsa.order]
  out = _finish(md.swiglu_grouped(rows, gate, up, down, rsa.group_sizes), mlp_axes)
  out = out[md.inverse_permutation(rsa.order)].reshape(ep, a, -1)
  # 5. Send results home; back[j, p] is the result for my sorted row starts[j] + p.
  back = jax.lax.all_to_all(out, ep_axes, 0, 0, tiled=True)
  ys = back[dest, pos - starts[dest]]  # [a, e] in sorted order
  y = ys[md.inverse_permutation(sa.order)].reshape(n, top_k, -1)
  return md.combine(y, w2, x.dtype).reshape(x.shape)


def _capacity_shard(x, weights, slot, gate, up, down, *, cap, ep_axes, ep, exchange, mlp_axes):
  """Per-shard capacity experts. x [b', t, e], weights/slot [b', t, K], gate [El, e, m'] ..."""
  bl, _, top_k = slot.shape
  num_local = gate.shape[0]
  num_experts = num_local * ep
  buffers = md.to_expert_major(md.dispatch(x, slot, num_experts * cap), num_experts)  # [E, b'C, e]
  if exchange:
    mine = jax.lax.all_to_all(buffers, ep_axes, 0, 1, tiled=True)  # [El, X b'C, e]
    out = _finish(md.swiglu_batched(mine, gate, up, down), mlp_axes)
    out = jax.lax.all_to_all(out, ep_axes, 1, 0, tiled=True)  # [E, b'C, e]
  else:
    offset = _local_expert_offset(ep_axes, num_local)
    mine = jax.lax.dynamic_slice_in_dim(buffers, offset, num_local, axis=0)
    out = _finish(md.swiglu_batched(mine, gate, up, down), mlp_axes)
    out = jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(buffers), out, offset, axis=0)
  y = md.gather_slots(md.from_expert_major(out, bl), slot)  # [b', t, K, e]
  y = md.combine(y.reshape(-1, top_k, y.shape[-1]), weights.reshape(-1, top_k), x.dtype)
  y = y.reshape(x.shape)
  return y if exchange else _finish(y, ep_axes)
