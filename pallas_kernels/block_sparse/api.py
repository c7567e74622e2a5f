"""Block-sparse attention in Pallas: Mosaic GPU (Hopper) and Mosaic TPU, fwd and bwd.

    from pallas_kernels.block_sparse import (
        CausalMask, LocalMask, block_sparse_attention, build_block_map)
    out = block_sparse_attention(q, k, v, CausalMask() & LocalMask(4096, 0))

Legend: layers/__init__.py; q [b, t, h, d], k and v [b, s, k, d] (h % k == 0:
MHA, GQA, MQA). Layouts, dtypes, configs, padding and interpret mode are
flash_attention's (this is its block-sparse variant and shares its machinery
in common/: plan, padding, online-softmax and gradient steps, Hopper CTAs).

The mask is static: a Mask (masks.py: Causal, Local, ChunkedCausal, PrefixLM,
Full, BlockMask, and their `&` / `|`) or a BlockMap built from one by
build_block_map. Given a Mask, the map is built (numpy, once per geometry: it
is cached) when the call is traced. Tiles without a visible pair cost
nothing; FULL tiles do no masking work; segment ids combine with the mask.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse import gpu as sparse_gpu
from pallas_kernels.block_sparse import gpu_bwd as sparse_gpu_bwd
from pallas_kernels.block_sparse import tpu as sparse_tpu
from pallas_kernels.block_sparse import tpu_bwd as sparse_tpu_bwd
from pallas_kernels.block_sparse.block_map import BlockMap, build_block_map
from pallas_kernels.block_sparse.masks import Mask
from pallas_kernels.common.plan import (Plan, check_inputs, make_plan, pick_config, row_delta,
                                        run_padded, static_scale)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Static data of one call: the plan (tiles, padding, interpret; common/plan.py) and the map."""
  plan: Plan
  block_map: BlockMap


def block_sparse_attention(q, k, v, mask, *, q_segment_ids=None, kv_segment_ids=None,
                           scale=None, interpret=False, config=None):
  """Softmax attention over the (query, key) pairs a static mask allows.

  Args:
    q: [b, t, h, d]; k, v: [b, s, k, d]; one float dtype (f32, bf16, f16; the
      GPU kernel takes bf16 / f16).
    mask: a Mask, or a BlockMap from build_block_map for exactly this geometry
      (t, s, h, k, d, config, interpret) — build it once outside the training
      step and pass it to skip even the cache lookup.
    q_segment_ids, kv_segment_ids: int [b, t] and [b, s] (both or neither);
      a pair is visible only if the mask allows it and the ids are equal.
    scale: logit scale (a Python float), default 1 / sqrt(d).
    interpret: False; True to run the kernel body on CPU; or interpret params.
    config: FlashAttentionConfig (chip, block sizes); None as in flash_attention.

  Returns:
    [b, t, h, d] in q.dtype. A query that sees no key gets 0 (and finite grads).

  Raises:
    ValueError: naming the argument, for shapes, dtypes, masks, maps or configs
      the kernels cannot serve.
  """
  check_inputs(q, k, v, q_segment_ids, kv_segment_ids)
  b, t, h, d = q.shape
  s, num_kv = k.shape[1], k.shape[2]
  scale = static_scale(scale, d)
  config = pick_config(config, interpret)
  if isinstance(mask, BlockMap):
    block_map = mask
    _check_map(block_map, t, s, h, num_kv, d, config, interpret)
  elif isinstance(mask, Mask):
    if t == 0 or s == 0:
      return jnp.zeros(q.shape, q.dtype)
    block_map = build_block_map(mask, q_len=t, kv_len=s, num_q_heads=h, num_kv_heads=num_kv,
                                head_dim=d, config=config, interpret=interpret)
  else:
    raise ValueError(f"mask={mask!r} must be a Mask (block_sparse.masks) or a BlockMap.")
  plan = make_plan(config.resolve(d), t, s, h // num_kv, (None, None),
                   q_segment_ids is not None, scale, interpret, q.dtype)
  static = _Static(plan, block_map)
  return run_padded(lambda *args: _core(*args, static), q, k, v, q_segment_ids,
                    kv_segment_ids, plan)


def _check_map(block_map, t, s, h, num_kv, d, config, interpret):
  want = (t, s, h, num_kv, d, config.resolve(d), bool(interpret))
  have = (block_map.q_len, block_map.kv_len, block_map.num_q_heads, block_map.num_kv_heads,
          block_map.head_dim, block_map.config, block_map.interpret)
  if want != have:
    names = ("q_len", "kv_len", "num_q_heads", "num_kv_heads", "head_dim", "config",
             "interpret")
    diff = ", ".join(f"{n}: map {a!r} vs call {b!r}" for n, a, b in zip(names, have, want)
                     if a != b)
    raise ValueError(f"mask: the BlockMap was built for another geometry ({diff}); "
                     "build it with build_block_map for this call.")


def _forward(q, k, v, q_seg, kv_seg, static: _Static):
  plan, bm = static.plan, static.block_map
  if plan.platform == "tpu":
    return sparse_tpu.forward(q, k, v, q_seg, kv_seg, kmap=bm.fwd, scale=plan.fwd.scale,
                              interpret=plan.interpret)
  return sparse_gpu.forward(q, k, v, q_seg, kv_seg, kmap=bm.fwd, scale=plan.fwd.scale,
                            slots=plan.config.max_concurrent_steps, interpret=plan.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(q, k, v, q_seg, kv_seg, static):
  return _forward(q, k, v, q_seg, kv_seg, static)[0]


def _core_fwd(q, k, v, q_seg, kv_seg, static):
  out, lse = _forward(q, k, v, q_seg, kv_seg, static)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _core_bwd(static, res, do):
  plan, bm = static.plan, static.block_map
  q, k, v, q_seg, kv_seg, out, lse = res
  args = (q, k, v, do, lse, row_delta(out, do, plan.platform), q_seg, kv_seg)
  if plan.platform == "tpu":
    kw = dict(scale=plan.fwd.scale, interpret=plan.interpret)
    dq = sparse_tpu_bwd.backward_dq(*args, kmap=bm.dq, **kw)
    dk, dv = sparse_tpu_bwd.backward_dkv(*args, kmap=bm.dkv, **kw)
  else:
    kw = dict(scale=plan.fwd.scale, slots=plan.config.max_concurrent_steps,
              wgs=plan.config.compute_wgs_bwd, interpret=plan.interpret)
    dq = sparse_gpu_bwd.backward_dq(*args, kmap=bm.dq, **kw)
    dk, dv = sparse_gpu_bwd.backward_dkv(*args, kmap=bm.dkv, **kw)
  return dq, dk, dv, None, None


_core.defvjp(_core_fwd, _core_bwd)
