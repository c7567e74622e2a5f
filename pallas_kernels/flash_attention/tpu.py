"""Mosaic TPU flash attention forward kernel, and the tile ranges its backward shares.

Legend: layers/__init__.py. Kernel layout is head-major: q [b, h, t, d], k/v
[b, k, s, d] (the public wrapper transposes), with t and s padded to whole
blocks. Scores are kept in log2 units (s * scale * log2 e) so the softmax uses
exp2 (common/tpu_steps.py).

Each q block visits only the kv blocks in [kv_lo, kv_hi) (scalar-prefetched,
from causal / window / segment ids); the k/v index map clamps to that range so
skipped steps issue no DMA. Tiles that are wholly visible skip the mask.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.common import masking
from pallas_kernels.common.masking import Tiling
from pallas_kernels.common.tpu import (LANES, SUBLANES, compiler_params, lane_replicated,
                                       run_tile, sublane_replicated, widen)
from pallas_kernels.common.tpu_steps import (log2_scores, softmax_finish, softmax_init,
                                             softmax_step)


def tile_ranges(tiling: Tiling, batch: int, q_seg, kv_seg):
  """Scalar-prefetch operands and grid extents for a launch.

  Returns:
    kv_range: (lo, hi) int32 [b * num_q_blocks] flattened; q_range: (lo, hi)
    [b * num_kv_blocks]; seg_stats: (q_min, q_max) [b * num_q_blocks] and
    (kv_min, kv_max) [b * num_kv_blocks], or ();
    max_kv_steps, max_q_steps.
  """
  stats = None
  if tiling.has_segments:
    stats = (*masking.segment_block_stats(q_seg, tiling.block_q),
             *masking.segment_block_stats(kv_seg, tiling.block_kv))
  kv_range, q_range, max_kv, max_q = masking.block_ranges(
      batch, tiling.num_q_blocks, tiling.num_kv_blocks, block_q=tiling.block_q,
      block_kv=tiling.block_kv, window=tiling.window, seg_stats=stats)
  flat = lambda xs: tuple(x.reshape(-1) for x in xs)
  return (flat(kv_range), flat(q_range), flat(stats) if stats else (), max_kv, max_q)


def tile_is_full(tiling: Tiling, q_block, kv_block, seg_refs, batch):
  """Traced bool: the tile (q_block, kv_block) needs no mask."""
  full = masking.tile_fully_visible(
      q_block, kv_block, block_q=tiling.block_q, block_kv=tiling.block_kv,
      window=tiling.window, kv_len=tiling.kv_len, padded_kv_len=tiling.padded_kv_len)
  if seg_refs:
    # Clamped: steps past the visited range still evaluate this (then skip).
    q_min, q_max, kv_min, kv_max = seg_refs
    qi = batch * tiling.num_q_blocks + jnp.minimum(q_block, tiling.num_q_blocks - 1)
    ki = batch * tiling.num_kv_blocks + jnp.minimum(kv_block, tiling.num_kv_blocks - 1)
    full = full & masking.segments_uniform(q_min[qi], q_max[qi], kv_min[ki], kv_max[ki])
  return jnp.asarray(full, jnp.bool_)


def clamp_block(lo, hi, step):
  """Block index visited at `step` of [lo, hi), clamped so extra steps repeat the last."""
  return jnp.minimum(lo + step, jnp.maximum(hi - 1, 0))


def _fwd_kernel(*refs, tiling: Tiling, num_steps: int):
  """One (batch, head, q block, kv step) of the forward pass."""
  kv_lo, kv_hi = refs[:2]
  n_seg = 4 if tiling.has_segments else 0
  seg_refs = refs[2:2 + n_seg]
  rest = refs[2 + n_seg:]
  if tiling.has_segments:
    q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
    q_seg_ref = kv_seg_ref = None
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  bq, bkv = tiling.block_q, tiling.block_kv
  lo, hi = kv_lo[b * tiling.num_q_blocks + i], kv_hi[b * tiling.num_q_blocks + i]
  kv_block = lo + j

  pl.when(j == 0)(lambda: softmax_init(m_ref, l_ref, acc_ref))

  def step(masked: bool):
    s = log2_scores(q_ref[...], k_ref[...], tiling.scale)  # [bq, bkv]
    if masked:
      rows = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bkv), 0)
      cols = kv_block * bkv + lax.broadcasted_iota(jnp.int32, (bq, bkv), 1)
      seg = {}
      if q_seg_ref is not None:
        seg = dict(q_seg=widen(q_seg_ref[...], bkv), kv_seg=kv_seg_ref[:1, :])
      mask = masking.visible(rows, cols, window=tiling.window,
                             kv_len=tiling.padded_kv, **seg)
      s = jnp.where(mask, s, -jnp.inf)
    softmax_step(s, v_ref[...], m_ref, l_ref, acc_ref)

  full = tile_is_full(tiling, i, kv_block, seg_refs, b)
  run_tile(kv_block < hi, full, tiling.needs_mask, step)
  pl.when(j == num_steps - 1)(lambda: softmax_finish(o_ref, lse_ref, m_ref, l_ref, acc_ref))


def forward(q, k, v, q_seg, kv_seg, *, tiling: Tiling, interpret):
  """Forward pass.

  Args:
    q: [b, h, t, d]; k, v: [b, k, s, d] (t, s padded).
    q_seg, kv_seg: int32 [b, t], [b, s] (padded) or None.

  Returns:
    out [b, h, t, d] in q.dtype; lse [b, h, t] float32 (log2 units).
  """
  batch, num_heads, _, head_dim = q.shape
  (kv_lo, kv_hi), _, seg_stats, max_kv, _ = tile_ranges(tiling, batch, q_seg, kv_seg)
  nq, bq, bkv = tiling.num_q_blocks, tiling.block_q, tiling.block_kv
  group = tiling.group

  def q_map(b, h, i, j, *_):
    return b, h, i, 0

  def kv_map(b, h, i, j, lo_ref, hi_ref, *_):
    kv_block = clamp_block(lo_ref[b * nq + i], hi_ref[b * nq + i], j)
    return b, h // group, kv_block, 0

  in_specs = [pl.BlockSpec((None, None, bq, head_dim), q_map),
              pl.BlockSpec((None, None, bkv, head_dim), kv_map),
              pl.BlockSpec((None, None, bkv, head_dim), kv_map)]
  operands = [q, k, v]
  if tiling.has_segments:
    def q_seg_map(b, h, i, j, *_):
      return b, i, 0

    def kv_seg_map(b, h, i, j, lo_ref, hi_ref, *_):
      return b, 0, clamp_block(lo_ref[b * nq + i], hi_ref[b * nq + i], j)

    in_specs += [pl.BlockSpec((None, bq, LANES), q_seg_map),
                 pl.BlockSpec((None, SUBLANES, bkv), kv_seg_map)]
    operands += [lane_replicated(q_seg), sublane_replicated(kv_seg)]

  out_specs = [pl.BlockSpec((None, None, bq, head_dim), q_map),
               pl.BlockSpec((None, None, SUBLANES, bq), lambda b, h, i, j, *_: (b, h, 0, i))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, num_heads, SUBLANES, tiling.padded_q_len),
                                    jnp.float32)]
  scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
             pltpu.VMEM((bq, head_dim), jnp.float32)]
  kernel = functools.partial(_fwd_kernel, tiling=tiling, num_steps=max_kv)
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2 + len(seg_stats),
          grid=(batch, num_heads, nq, max_kv),
          in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="flash_attention_fwd",
  )(kv_lo, kv_hi, *seg_stats, *operands)
  return out, lse[:, :, 0, :]
