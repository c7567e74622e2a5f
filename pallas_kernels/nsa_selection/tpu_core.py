"""XLA side of the TPU selected-block kernels: query chunks, pair lists, custom VJP.

Legend: layers/__init__.py. The TPU kernels scalar-prefetch their tables into
SMEM (about 1 MiB per core on current chips). A call's tables grow with
b * k * t * ns, so long sequences run as a loop (lax.map / lax.scan) over
chunks of `query_chunk` queries, each with its own slice of the block table
and the position of its first query: the forward and dq are per chunk, and
dk/dv are summed over chunks in float32. For the kernels (and below, where a
chunk is meant) t is a chunk's length.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common.tpu import LANES, SMEM_PREFETCH_WORDS, SUBLANES
from pallas_kernels.nsa_selection import tpu
from pallas_kernels.nsa_selection import tpu_bwd
from pallas_kernels.nsa_selection.tpu import Geometry


def query_chunk(batch: int, geo: Geometry) -> int:
  """Queries per kernel call so that the largest call's tables fit SMEM_PREFETCH_WORDS.

  The dk/dv call is the largest: two pair arrays of b * k * (t * ns + nb) words,
  the query segment ids (b * t) and the offset, with t the chunk's queries.

  Raises:
    ValueError: when not even one query fits (shard the batch or kv heads).
  """
  rows = batch * geo.num_kv_heads
  free = SMEM_PREFETCH_WORDS - 2 * rows * geo.num_blocks - 1
  chunk = free // (2 * rows * geo.top_n + batch)
  if chunk < 1:
    raise ValueError(
        f"batch={batch} x num_kv_heads={geo.num_kv_heads} with {geo.num_blocks} kv blocks "
        f"leaves no room for a query's tables in {SMEM_PREFETCH_WORDS} SMEM words; shard the "
        "batch or the kv heads over more devices, or raise block_size.")
  return min(chunk, geo.q_len)


def pair_list(blk, act, geo: Geometry):
  """The dkv kernel's (block, query) pairs of one chunk, sorted by block per (batch, kv head).

  Args:
    blk, act: int32 [b, k, t, ns] block table of the chunk.

  Returns (pair_blk, pair_q) int32 [b * k * (t * ns + nb)]; pair_q is the
  query's index in the chunk, -1 for inactive slots and for the one no-op pair
  appended per block (so the kernel writes every block).
  """
  t, n, nb = geo.q_len, geo.top_n, geo.num_blocks
  blk = blk.reshape(-1, t * n)
  q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, n)).reshape(-1)
  q_of = jnp.where(act.reshape(-1, t * n) != 0, q_pos, -1)
  rows = blk.shape[0]
  blocks = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (rows, nb))
  keys = jnp.concatenate([blk, blocks], axis=1)
  qs = jnp.concatenate([q_of, jnp.full((rows, nb), -1, jnp.int32)], axis=1)
  order = jnp.argsort(keys, axis=1, stable=True)
  pair_blk = jnp.take_along_axis(keys, order, axis=1)
  pair_q = jnp.take_along_axis(qs, order, axis=1)
  return pair_blk.reshape(-1), pair_q.reshape(-1)


def _rows(x):
  """[..., g] -> [..., 8, g] sublane-replicated rows."""
  return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], SUBLANES, x.shape[-1]))


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """One chunk's kernel inputs (leading axis: chunks, when stacked)."""
  q: jax.Array  # [b, k, t, g, d], t the chunk's queries
  blk: jax.Array  # [b, k, t, ns]
  act: jax.Array  # [b, k, t, ns]
  offset: jax.Array  # [1]
  q_seg: jax.Array | None  # [b * t]


jax.tree_util.register_dataclass(_Chunk, data_fields=["q", "blk", "act", "offset", "q_seg"],
                                 meta_fields=[])


def attention(q, k, v, blk, act, q_seg, kv_seg, *, geo: Geometry, interpret):
  """Selected-block attention on TPU in kernel layout.

  Args:
    q: [b, k, t, g, d]; k, v: [b, k, nb·B, d] (zero-padded).
    blk, act: int32 [b, k, t, ns] block table (api.block_table).
    q_seg: int32 [b, t] or None; kv_seg: int32 [b, nb·B] (edge-padded) or None.
    geo: the call's Geometry (q_len = t).

  Returns:
    [b, k, t, g, d] in q.dtype.
  """
  b, t = q.shape[0], geo.q_len
  tc = query_chunk(b, geo)
  num_chunks = -(-t // tc)
  pad = num_chunks * tc - t

  def chunked(x, fill=0):
    """[b, k, t, ...] (or [b, t]) -> [chunks, ..., chunk length, ...] along the query axis."""
    axis = 1 if x.ndim == 2 else 2
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    x = jnp.pad(x, widths, constant_values=fill)
    x = x.reshape(*x.shape[:axis], num_chunks, tc, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  offsets = (jnp.arange(num_chunks, dtype=jnp.int32) * tc)[:, None]
  q_segs = None if q_seg is None else chunked(q_seg).reshape(num_chunks, -1)
  chunks = _Chunk(chunked(q), chunked(blk), chunked(act), offsets, q_segs)
  segs = None if kv_seg is None else _kv_seg_operands(kv_seg, geo)
  out = _core(chunks, k, v, segs, dataclasses.replace(geo, q_len=tc), interpret)
  out = jnp.moveaxis(out, 0, 2)  # [b, k, chunks, chunk length, g, d]
  return out.reshape(*out.shape[:2], num_chunks * tc, *out.shape[4:])[:, :, :t]


def _kv_seg_operands(kv_seg, geo: Geometry):
  """(kv ids as [b, nb, 8, B] rows for fwd/dq, lane-replicated [b, nb·B, 128] for dkv)."""
  b = kv_seg.shape[0]
  blocks = kv_seg.reshape(b, geo.num_blocks, 1, geo.block)
  rows = jnp.broadcast_to(blocks, (b, geo.num_blocks, SUBLANES, geo.block))
  return rows, jnp.broadcast_to(kv_seg[:, :, None], (*kv_seg.shape, LANES))


def _flat(c: _Chunk):
  return c.blk.reshape(-1), c.act.reshape(-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _core(chunks, k, v, segs, geo, interpret):
  return _forward(chunks, k, v, segs, geo, interpret)[0]


def _forward(chunks, k, v, segs, geo, interpret):
  kv_rows = None if segs is None else segs[0]

  def one(c: _Chunk):
    return tpu.forward(c.q, k, v, *_flat(c), c.offset, c.q_seg, kv_rows, geo=geo,
                       interpret=interpret)
  return jax.lax.map(one, chunks)


def _core_fwd(chunks, k, v, segs, geo, interpret):
  out, lse = _forward(chunks, k, v, segs, geo, interpret)
  return out, (chunks, k, v, segs, out, lse)


def _core_bwd(geo, interpret, res, do):
  chunks, k, v, segs, out, lse = res
  delta = _rows(jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1))
  kv_rows, kv_cols = (None, None) if segs is None else segs

  def one(carry, xs):
    c, do_c, lse_c, delta_c = xs
    args = (c.q, k, v, do_c, lse_c, delta_c)
    blk, act = _flat(c)
    dq = tpu_bwd.backward_dq(*args, blk, act, c.offset, c.q_seg, kv_rows, geo=geo,
                             interpret=interpret)
    pair_blk, pair_q = pair_list(c.blk, c.act, geo)
    dk, dv = tpu_bwd.backward_dkv(*args, pair_blk, pair_q, c.offset, c.q_seg, kv_cols, geo=geo,
                                  interpret=interpret)
    return (carry[0] + dk, carry[1] + dv), dq

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(one, (zeros, zeros), (chunks, do, lse, delta))
  dchunks = _Chunk(dq, None, None, None, None)
  return dchunks, dk.astype(k.dtype), dv.astype(v.dtype), None


_core.defvjp(_core_fwd, _core_bwd)
