"""Selected-block attention in Pallas (NSA's selection branch), forward and backward.

    from pallas_kernels.nsa_selection import selected_block_attention
    out = selected_block_attention(q, k, v, block_indices, block_size=64)

Legend: layers/__init__.py (B block length, nb = ceil(s / B) blocks, ns
selected blocks per query). q [b, t, h, d], k and v [b, s, k, d],
block_indices int [b, t, k, ns]: the kv blocks query i of kv head c attends to
(-1: unused slot). Semantics, including segment ids, are those of
`reference.selected_block_attention_reference`.

The kernel family comes from `config.chip` (static data, a
FlashAttentionConfig whose block sizes are ignored): TPU chips run the Mosaic
TPU kernels (tpu.py forward, tpu_bwd.py dq and dk/dv), GPU chips (h100, h200)
the Mosaic GPU kernels (gpu.py forward, gpu_bwd.py dq and dk/dv;
bfloat16/float16, d % 64 == 0, B % 64 == 0, g <= 64); both forward and
Pallas backward.
`interpret=True` runs the chosen kernels on CPU (the TPU ones by default; a
GPU config or the GPU interpreter's params select the GPU one).
Differentiable (custom_vjp) in q, k and v; block_indices get no gradient.

The TPU kernels scalar-prefetch their tables into SMEM, so long sequences run
as a loop over query chunks (tpu_core.py, with the TPU custom VJP); the GPU
kernels read their tables from global memory (their custom VJP is here).
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels.common import config as config_lib
from pallas_kernels.common import gpu as gpu_ops
from pallas_kernels.common.config import FlashAttentionConfig
from pallas_kernels.common.tpu import SUBLANES
from pallas_kernels.nsa_selection import gpu
from pallas_kernels.nsa_selection import gpu_bwd
from pallas_kernels.nsa_selection import tpu_core
from pallas_kernels.nsa_selection.tpu import Geometry


_DTYPES = (jnp.float32, jnp.bfloat16)


def selected_block_attention(q, k, v, block_indices, *, block_size: int, scale=None,
                             q_segment_ids=None, kv_segment_ids=None, interpret=False,
                             config=None):
  """Each query attends (causally) to its selected kv blocks only.

  Args:
    q: [b, t, h, d]; k, v: [b, s, k, d]; float32 or bfloat16, one dtype.
    block_indices: int [b, t, k, ns]; entries outside 0 .. nb - 1 are unused
      slots; the valid entries of one (b, i, c) should be distinct (a repeated
      block is counted twice, as in the reference).
    block_size: B (a multiple of 8 for the compiled TPU kernel).
    scale: logit scale (a Python float), default 1 / sqrt(d).
    q_segment_ids, kv_segment_ids: int [b, t], [b, s] (both or neither): query
      i sees key j only if their ids are equal.
    interpret: False, True (run on CPU), a pltpu.InterpretParams (TPU) or the
      Mosaic GPU interpreter's params (common.gpu.interpret_params).
    config: FlashAttentionConfig naming the chip; None: TPU v5e when
      interpreting (h100 with GPU interpreter params), else the chip of
      jax.devices()[0].

  Returns:
    [b, t, h, d] in q.dtype; a query that sees no key gets 0.

  Raises:
    ValueError: for shapes, dtypes, block sizes or chips the kernels cannot serve.
  """
  _check(q, k, v, block_indices, q_segment_ids, kv_segment_ids, block_size)
  b, t, h, d = q.shape
  s, num_kv = k.shape[1], k.shape[2]
  n = block_indices.shape[3]
  scale = float(1.0 / math.sqrt(d) if scale is None else scale)
  if config is None and interpret:
    gpu_params = type(interpret).__name__ == "InterpretGPUParams"
    config = config_lib.default_config("h100" if gpu_params else "tpu_v5e")
  elif config is None:
    config = config_lib.default_config(_device_chip())
  if not isinstance(config, FlashAttentionConfig):
    raise ValueError(f"config={config!r} must be a FlashAttentionConfig or None.")
  if config.platform == "gpu":
    _check_gpu(q, k, block_size)
  elif config.platform != "tpu":
    raise ValueError(f"config.chip={config.chip!r}: no selected-block kernel for platform "
                     f"{config.platform!r}.")
  elif not interpret and block_size % SUBLANES:
    raise ValueError(f"block_size={block_size} must be a multiple of {SUBLANES} on TPU.")
  if t == 0 or s == 0 or n == 0:
    return jnp.zeros(q.shape, q.dtype)
  nb = -(-s // block_size)
  geo = Geometry(block=block_size, q_len=t, kv_len=s, padded_kv_len=nb * block_size,
                 num_kv_heads=num_kv, group=h // num_kv, top_n=n, scale=scale,
                 has_segments=q_segment_ids is not None)
  if config.platform == "gpu":
    if interpret is True:
      interpret = gpu_ops.interpret_params()
    return _gpu_attention(q, k, v, block_indices, q_segment_ids, kv_segment_ids, geo,
                          _hashable(interpret) or False)
  interpret = interpret if isinstance(interpret, bool) else _hashable(interpret)
  qk = q.reshape(b, t, num_kv, geo.group, d).transpose(0, 2, 1, 3, 4)
  kk = _padded(k, geo).transpose(0, 2, 1, 3)
  vk = _padded(v, geo).transpose(0, 2, 1, 3)
  blk, act = block_table(block_indices, geo)
  q_seg = kv_seg = None
  if geo.has_segments:
    q_seg = q_segment_ids.astype(jnp.int32)
    kv_seg = _padded(kv_segment_ids.astype(jnp.int32), geo, mode="edge")
  out = tpu_core.attention(qk, kk, vk, blk, act, q_seg, kv_seg, geo=geo, interpret=interpret)
  return out.transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def _device_chip() -> str:
  chip = config_lib.chip_of_device(jax.devices()[0])
  if chip is None:
    raise ValueError("config=None and no selected-block kernel targets "
                     f"{jax.devices()[0].device_kind!r}: pass interpret=True on CPU or "
                     "an explicit config.")
  return chip


def _check_gpu(q, k, block_size):
  """The Mosaic GPU kernel's limits (wgmma tiles), as ValueErrors naming the field."""
  if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"q.dtype={jnp.dtype(q.dtype)}: the Mosaic GPU selection kernel takes "
                     "bfloat16 or float16 (wgmma operands).")
  if q.shape[3] % 64:
    raise ValueError(f"head_dim={q.shape[3]} must be a multiple of 64 for the Mosaic GPU "
                     "selection kernel.")
  if block_size % gpu.ROWS:
    raise ValueError(f"block_size={block_size} must be a multiple of {gpu.ROWS} for the Mosaic "
                     "GPU selection kernels (the dk/dv wgmma tile; model.nsa.select_block).")
  if q.shape[2] // k.shape[2] > gpu.ROWS:
    raise ValueError(f"num_q_heads / num_kv_heads = {q.shape[2] // k.shape[2]} must be <= "
                     f"{gpu.ROWS} for the Mosaic GPU selection kernel.")


def _hashable(interpret):
  hash(interpret)
  return interpret


def _check(q, k, v, idx, q_seg, kv_seg, block_size):
  for name, x in (("q", q), ("k", k), ("v", v), ("block_indices", idx)):
    if jnp.ndim(x) != 4:
      raise ValueError(f"{name} must be 4-D; got shape {jnp.shape(x)}.")
  if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
    raise ValueError(f"k {k.shape} and v {v.shape} must match each other, and q {q.shape} "
                     "in batch and head_dim.")
  if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
    raise ValueError(f"num_q_heads={q.shape[2]} must be a multiple of num_kv_heads={k.shape[2]}.")
  if idx.shape[:3] != (q.shape[0], q.shape[1], k.shape[2]):
    raise ValueError(f"block_indices must be [b, t, k, ns] = {(*q.shape[:2], k.shape[2])} + "
                     f"(ns,); got {idx.shape}.")
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f"block_indices must be integer; got {idx.dtype}.")
  if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in map(jnp.dtype, _DTYPES):
    raise ValueError(f"q, k, v must share one dtype of float32/bfloat16; got {q.dtype}, "
                     f"{k.dtype}, {v.dtype}.")
  if not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"block_size={block_size!r} must be a positive int.")
  if (q_seg is None) != (kv_seg is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together.")
  if q_seg is not None and (q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]):
    raise ValueError(f"segment ids must be [b, t] = {q.shape[:2]} and [b, s] = {k.shape[:2]}; "
                     f"got {q_seg.shape}, {kv_seg.shape}.")


def block_table(block_indices, geo: Geometry):
  """The kernels' block table: (blk, act) int32 [b, k, t, ns].

  act is 1 where the slot holds a valid block that starts at or before the
  query. blk is the slot's block where active; elsewhere it repeats the last
  active block before it (or the query's own block), so skipped steps of the
  grid fetch nothing new.
  """
  idx = block_indices.astype(jnp.int32).transpose(0, 2, 1, 3)  # [b, k, t, ns]
  q_pos = jnp.arange(geo.q_len, dtype=jnp.int32)[:, None]
  active = (idx >= 0) & (idx < geo.num_blocks) & (idx * geo.block <= q_pos)
  slots = jnp.arange(geo.top_n, dtype=jnp.int32)
  last = lax.cummax(jnp.where(active, slots, -1), axis=3)
  prev = jnp.take_along_axis(idx, jnp.maximum(last, 0), axis=3)
  own = jnp.minimum(q_pos // geo.block, geo.num_blocks - 1)
  blk = jnp.where(last >= 0, prev, jnp.broadcast_to(own, idx.shape))
  return blk, active.astype(jnp.int32)


def _padded(x, geo: Geometry, mode="constant"):
  """x [b, s, ...] zero- (or edge-) padded to [b, nb·B, ...]."""
  widths = [(0, 0), (0, geo.padded_kv_len - geo.kv_len)] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x, widths, mode=mode)


def _gpu_attention(q, k, v, block_indices, q_seg, kv_seg, geo: Geometry, interpret):
  """The Mosaic GPU kernels on the public layout: [b, t, h, d]."""
  blk, act = block_table(block_indices, geo)
  if q_seg is not None:
    q_seg = q_seg.astype(jnp.int32)
    kv_seg = _padded(kv_seg.astype(jnp.int32), geo, mode="edge")
  return _gpu_core(q, _padded(k, geo), _padded(v, geo), blk, act, q_seg, kv_seg, geo,
                   interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _gpu_core(q, kp, vp, blk, act, q_seg, kv_seg, geo, interpret):
  """kp, vp: k, v zero-padded to whole blocks; returns [b, t, h, d]."""
  return _gpu_core_fwd(q, kp, vp, blk, act, q_seg, kv_seg, geo, interpret)[0]


def _gpu_core_fwd(q, kp, vp, blk, act, q_seg, kv_seg, geo, interpret):
  out, lse = gpu.forward(q, kp, vp, blk, act, q_seg, kv_seg, block=geo.block,
                         kv_len=geo.kv_len, scale=geo.scale, interpret=interpret)
  return out, (q, kp, vp, blk, act, q_seg, kv_seg, out, lse)


def _gpu_core_bwd(geo, interpret, res, do):
  q, kp, vp, blk, act, q_seg, kv_seg, out, lse = res
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  shape = gpu_bwd.Shape(block=geo.block, kv_len=geo.kv_len, num_blocks=geo.num_blocks,
                        top_n=geo.top_n, scale=geo.scale, has_segments=q_seg is not None)
  args = (q, kp, vp, do.astype(q.dtype), lse, delta, blk, act, q_seg, kv_seg)
  dq = gpu_bwd.backward_dq(*args, shape=shape, interpret=interpret)
  dk, dv = gpu_bwd.backward_dkv(*args, shape=shape, interpret=interpret)
  return dq, dk, dv, None, None, None, None


_gpu_core.defvjp(_gpu_core_fwd, _gpu_core_bwd)
