"""The routed experts' SwiGLU as a grouped matmul over rows sorted by expert.

Two implementations of the same function:
  ragged   `jax.lax.ragged_dot`: native on GPU and TPU.
  tiled    rows are laid out in tiles of `tile` rows that each belong to one
           expert (every group padded to whole tiles), and multiplied as one
           batched einsum with the tile's expert weights. XLA:CPU runs
           ragged_dot as a slow loop; this is ~8x faster there.
`swiglu_grouped` picks 'tiled' on CPU and 'ragged' elsewhere.

Shapes: see layers/__init__.py (here a rows, e, m, E, T tiles, r rows per tile).
"""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

IMPLS = ("ragged", "tiled")
DEFAULT_TILE = 64


def default_impl() -> str:
  return "tiled" if jax.default_backend() == "cpu" else "ragged"


def _swiglu_ragged(xs, gate, up, down, group_sizes):
  h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, group_sizes))
  h = checkpoint_name(h * jax.lax.ragged_dot(xs, up, group_sizes), "moe_hidden")
  return jax.lax.ragged_dot(h, down, group_sizes)


def _tile_layout(group_sizes: jax.Array, num_rows: int, tile: int):
  """Where each padded-tile row comes from, and where each row goes.

  Returns:
    source [T * r] int32: the row of xs each tile row holds (0 for padding);
    valid [T * r] bool: whether it holds a real row;
    tile_expert [T] int32: the expert of each tile;
    destination [a] int32: each row's place among the tile rows;
    in_group [a] bool: whether the row belongs to some group (rows past
      sum(group_sizes) are left out and come back as zeros).
  """
  num_experts = group_sizes.shape[0]
  num_tiles = -(-num_rows // tile) + num_experts  # Every group may waste < 1 tile.
  padded = (group_sizes + tile - 1) // tile * tile
  padded_start = jnp.cumsum(padded) - padded  # [E]
  start = jnp.cumsum(group_sizes) - group_sizes  # [E]
  slot = jnp.arange(num_tiles * tile, dtype=jnp.int32)
  expert = jnp.searchsorted(jnp.cumsum(padded), slot, side="right").astype(jnp.int32)
  expert = jnp.minimum(expert, num_experts - 1)
  rank = slot - padded_start[expert]
  valid = (rank < group_sizes[expert]) & (slot < jnp.sum(padded))
  source = jnp.where(valid, start[expert] + rank, 0)
  row = jnp.arange(num_rows, dtype=jnp.int32)
  row_expert = jnp.searchsorted(jnp.cumsum(group_sizes), row, side="right").astype(jnp.int32)
  in_group = row_expert < num_experts
  row_expert = jnp.minimum(row_expert, num_experts - 1)
  destination = padded_start[row_expert] + row - start[row_expert]
  tile_expert = expert.reshape(num_tiles, tile)[:, 0]
  return source, valid, tile_expert, jnp.where(in_group, destination, 0), in_group


def _swiglu_tiled(xs, gate, up, down, group_sizes, tile: int):
  num_rows, e = xs.shape
  source, valid, tile_expert, destination, in_group = _tile_layout(group_sizes, num_rows, tile)
  tiles = jnp.where(valid[:, None], xs[source], 0).reshape(-1, tile, e)  # [T, r, e]
  h = jax.nn.silu(jnp.einsum("tre,tem->trm", tiles, gate[tile_expert]))
  h = h * jnp.einsum("tre,tem->trm", tiles, up[tile_expert])
  h = checkpoint_name(h, "moe_hidden")
  y = jnp.einsum("trm,tme->tre", h, down[tile_expert]).reshape(-1, e)
  return jnp.where(in_group[:, None], y[destination], 0)


def swiglu_grouped(xs: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                   group_sizes: jax.Array, *, impl: str | None = None,
                   tile: int = DEFAULT_TILE) -> jax.Array:
  """down(silu(xs @ gate[i]) * (xs @ up[i])) with i each row's expert.

  Args:
    xs: [a, e] rows sorted by expert (group i's rows follow group i - 1's).
    gate, up: [E, e, m]; down: [E, m, e].
    group_sizes: int32 [E], rows per expert; rows past their sum give zeros.
    impl: 'ragged' | 'tiled' | None (tiled on CPU, ragged elsewhere).
    tile: rows per tile of the tiled implementation.
  Returns:
    [a, e].
  """
  impl = default_impl() if impl is None else impl
  if impl == "ragged":
    return _swiglu_ragged(xs, gate, up, down, group_sizes)
  if impl == "tiled":
    return _swiglu_tiled(xs, gate, up, down, group_sizes, tile)
  raise ValueError(f"grouped matmul impl={impl!r}; choose one of {IMPLS}.")
