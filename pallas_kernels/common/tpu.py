"""Mosaic TPU helpers shared by every TPU kernel: layout constants, replication, tile runs.

Per-row statistics live lane-replicated as (rows, 128) f32 (the layout Mosaic
handles best); per-column ones as (8, cols) sublane-replicated rows.
"""

import math

import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp

LANES = 128
SUBLANES = 8
# int32 words of scalar-prefetched tables one kernel call may hold in SMEM:
# half of the 1 MiB of TPU v4 .. v6e, the rest left to Mosaic.
SMEM_PREFETCH_WORDS = 1 << 17
LOG2E = math.log2(math.e)


def widen(x, n: int):
  """(rows, 128) lane-replicated -> (rows, n) (tile, or slice when n < 128)."""
  if n == x.shape[1]:
    return x
  if n % x.shape[1] == 0:
    return jnp.tile(x, (1, n // x.shape[1]))
  return jnp.tile(x, (1, pl.cdiv(n, x.shape[1])))[:, :n]


def lane_replicated(x):
  """[b, len] -> [b, len, 128] (column values, lane-replicated)."""
  return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def sublane_replicated(x):
  """[..., len] -> [..., 8, len] (row values, sublane-replicated)."""
  return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], SUBLANES, x.shape[-1]))


def run_tile(run, full, needs_mask: bool, step):
  """Calls step(masked) under pl.when for the visited, full/partial cases."""
  if not needs_mask:
    pl.when(run)(lambda: step(False))
    return
  pl.when(run & full)(lambda: step(False))
  pl.when(run & jnp.logical_not(full))(lambda: step(True))


def compiler_params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)
