"""Mosaic TPU selected-block attention forward (NSA's selection branch), and its geometry.

Legend: layers/__init__.py. Kernel layout (the public wrapper transposes): q, o,
do [b, k, t, g, d], k, v, dk, dv [b, k, nb·B, d] (s padded to whole blocks of
B), per-query statistics lse, delta [b, k, t, 8, g] (rows, sublane-replicated;
log2 units), kv segment ids [b, nb, 8, B].

Group-centric: the forward and dq (tpu_bwd.py) grids are (b, k, t, ns). One
program owns one query position i of one kv head and its g query heads ([g, d]
rows); step j loads the j-th selected kv block [B, d] once for the whole group,
through an index map that reads the scalar-prefetched block table. Inactive
slots (unused, or a block wholly after i) skip the math, and the table repeats
the previous block for them so they issue no new DMA.
"""

import dataclasses
import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.common.tpu import LANES, SUBLANES, compiler_params
from pallas_kernels.common.tpu_steps import (log2_scores, softmax_finish, softmax_init,
                                             softmax_step)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static shape data of one call.

  Attributes:
    block: B, keys per kv block.
    q_len: queries per kernel call (a chunk of t, see tpu_core.query_chunk);
    kv_len: s; padded_kv_len: nb·B.
    num_kv_heads: k; group: g = h // k; top_n: ns slots per query.
    scale: logit scale (natural units).
    has_segments: segment ids are given.
  """
  block: int
  q_len: int
  kv_len: int
  padded_kv_len: int
  num_kv_heads: int
  group: int
  top_n: int
  scale: float
  has_segments: bool

  @property
  def num_blocks(self) -> int:
    return self.padded_kv_len // self.block

  @property
  def num_pairs(self) -> int:
    """Length of the dkv pair list per (batch, kv head): t * ns + nb."""
    return self.q_len * self.top_n + self.num_blocks


def tile_mask(geo: Geometry, q_pos, kv_pos, q_seg, kv_seg):
  """Causal (+ padding, + segment) visibility of a tile; q_seg a scalar."""
  mask = kv_pos <= q_pos
  if geo.kv_len != geo.padded_kv_len:
    mask = mask & (kv_pos < geo.kv_len)
  if q_seg is not None:
    mask = mask & (kv_seg == q_seg)
  return mask


def slot_index(geo: Geometry, b, kh, i, j):
  """Flat index of slot j of query i, kv head kh, batch b in the block table."""
  return ((b * geo.num_kv_heads + kh) * geo.q_len + i) * geo.top_n + j


def split_refs(refs, has_segments: bool, n_in: int):
  """(table, table, q_offset, q_seg or None), inputs, kv_seg or None, rest."""
  n_pre = 4 if has_segments else 3
  pre, rest = refs[:n_pre], refs[n_pre:]
  ins, rest = rest[:n_in], rest[n_in:]
  kv_seg = None
  if has_segments:
    kv_seg, rest = rest[0], rest[1:]
  return (*pre[:3], pre[3] if has_segments else None), ins, kv_seg, rest


def _fwd_kernel(*refs, geo: Geometry):
  (blk_ref, act_ref, q_off, q_seg_ref), (q_ref, k_ref, v_ref), kv_seg_ref, rest = split_refs(
      refs, geo.has_segments, 3)
  o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
  b, kh, i, j = (pl.program_id(a) for a in range(4))
  g, bk = geo.group, geo.block
  slot = slot_index(geo, b, kh, i, j)

  @pl.when(j == 0)
  def _init():
    softmax_init(m_ref, l_ref, acc_ref)

  @pl.when(act_ref[slot] != 0)
  def _step():
    s = log2_scores(q_ref[...], k_ref[...], geo.scale)  # [g, B]
    kv_pos = blk_ref[slot] * bk + lax.broadcasted_iota(jnp.int32, (g, bk), 1)
    seg = (q_seg_ref[b * geo.q_len + i], kv_seg_ref[:1, :]) if geo.has_segments else (None,) * 2
    s = jnp.where(tile_mask(geo, q_off[0] + i, kv_pos, *seg), s, -jnp.inf)
    softmax_step(s, v_ref[...], m_ref, l_ref, acc_ref)

  @pl.when(j == geo.top_n - 1)
  def _finish():
    softmax_finish(o_ref, lse_ref, m_ref, l_ref, acc_ref)


def query_specs(geo: Geometry, head_dim: int):
  """BlockSpecs of the (b, k, t, ns) grids: q rows, kv block, stat rows, kv segs."""
  g, bk = geo.group, geo.block

  def q_map(b, kh, i, j, *_):
    return b, kh, i, 0, 0

  def kv_map(b, kh, i, j, blk_ref, *_):
    return b, kh, blk_ref[slot_index(geo, b, kh, i, j)], 0

  def seg_map(b, kh, i, j, blk_ref, *_):
    return b, blk_ref[slot_index(geo, b, kh, i, j)], 0, 0

  return (pl.BlockSpec((None, None, None, g, head_dim), q_map),
          pl.BlockSpec((None, None, bk, head_dim), kv_map),
          pl.BlockSpec((None, None, None, SUBLANES, g), q_map),
          pl.BlockSpec((None, None, SUBLANES, bk), seg_map))


def prefetch_operands(table_a, table_b, q_offset, q_seg):
  return (table_a, table_b, q_offset) + ((q_seg,) if q_seg is not None else ())


def forward(q, k, v, blk, act, q_offset, q_seg, kv_seg, *, geo: Geometry, interpret):
  """Forward pass.

  Args:
    q: [b, k, t, g, d]; k, v: [b, k, nb·B, d].
    blk, act: int32 [b * k * t * ns]: block of each slot, and 1 where it runs.
    q_offset: int32 [1], position of the call's first query (t queries from it).
    q_seg: int32 [b * t] or None; kv_seg: int32 [b, nb, 8, B] or None.

  Returns:
    out [b, k, t, g, d] in q.dtype; lse [b, k, t, 8, g] float32 (log2 units).
  """
  batch, num_kv, t, g, head_dim = q.shape
  q_spec, kv_spec, row_spec, seg_spec = query_specs(geo, head_dim)
  in_specs = [q_spec, kv_spec, kv_spec] + ([seg_spec] if geo.has_segments else [])
  operands = [q, k, v] + ([kv_seg] if geo.has_segments else [])
  prefetch = prefetch_operands(blk, act, q_offset, q_seg)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, geo=geo),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=(batch, num_kv, t, geo.top_n),
          in_specs=in_specs, out_specs=[q_spec, row_spec],
          scratch_shapes=[pltpu.VMEM((g, LANES), jnp.float32),
                          pltpu.VMEM((g, LANES), jnp.float32),
                          pltpu.VMEM((g, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_kv, t, SUBLANES, g), jnp.float32)],
      compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="nsa_selection_fwd",
  )(*prefetch, *operands)
