"""Flash attention in Pallas: Mosaic GPU (Hopper) and Mosaic TPU, forward and backward.

    from pallas_kernels.flash_attention import flash_attention
    out = flash_attention(q, k, v, causal=True, q_segment_ids=ids, kv_segment_ids=ids)

Legend: layers/__init__.py. Layout is jax.nn.dot_product_attention's:
q [b, t, h, d], k and v [b, s, k, d] (h % k == 0: MHA, GQA, MQA).

The kernel is picked from `config.chip` (static data), never from the device
being traced for: 'h100'/'h200' run the Mosaic GPU kernel, 'tpu_*' the Mosaic
TPU kernel. `interpret=True` runs the chosen kernel body on CPU. The wrapper
pads t and s to whole blocks (padded keys are masked, padded queries dropped;
common/plan.py) and differentiates through a custom_vjp whose backward is
Pallas kernels too.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import masking
from pallas_kernels.common.plan import (Plan, check_inputs, make_plan, pick_config, row_delta,
                                        run_padded, static_scale)
from pallas_kernels.flash_attention import gpu as gpu_fwd
from pallas_kernels.flash_attention import gpu_bwd
from pallas_kernels.flash_attention import tpu as tpu_fwd
from pallas_kernels.flash_attention import tpu_bwd


def flash_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                    local_window_size=None, scale=None, interpret=False, config=None):
  """Softmax attention without materializing the [t, s] score matrix.

  Args:
    q: [b, t, h, d]; k, v: [b, s, k, d]; one float dtype (f32, bf16, f16).
    causal: query i sees key j only if j <= i (top-left aligned, like jax.nn).
    q_segment_ids, kv_segment_ids: int [b, t] and [b, s] (both or neither);
      query i sees key j only if their ids are equal (packed documents).
    local_window_size: None, w, or (left, right): query i sees keys
      i - left .. i + right.
    scale: logit scale (a Python float), default 1 / sqrt(d).
    interpret: False; True to run the kernel body on CPU; or an interpret
      params object (pltpu.InterpretParams for TPU configs, the GPU
      interpreter's params for GPU configs) passed through to Pallas.
    config: FlashAttentionConfig (chip and block sizes). None: the default
      config of jax.devices()[0] (a device query while tracing: build it with
      `default_config()` outside jit and pass it to avoid that); when
      interpreting, the TPU v5e config (h100 for GPU interpret params).

  Returns:
    [b, t, h, d] in q.dtype. A query that sees no key gets 0 (and finite grads).

  Raises:
    ValueError: naming the argument, for shapes, dtypes, windows, segment ids or
      configs the kernels cannot serve.
  """
  check_inputs(q, k, v, q_segment_ids, kv_segment_ids)
  b, t, h, d = q.shape
  s, num_kv = k.shape[1], k.shape[2]
  window = masking.normalize_window(local_window_size, causal)
  scale = static_scale(scale, d)
  config = pick_config(config, interpret)
  if t == 0 or s == 0:
    return jnp.zeros(q.shape, q.dtype)  # no queries, or no keys: every row is empty
  has_segments = q_segment_ids is not None
  plan = make_plan(config.resolve(d), t, s, h // num_kv, window, has_segments,
                   scale, interpret, q.dtype)
  return run_padded(lambda *args: _core(*args, plan), q, k, v, q_segment_ids,
                    kv_segment_ids, plan)


def _forward(q, k, v, q_seg, kv_seg, plan: Plan):
  """(out, lse [b, h, t] f32) in the platform's kernel layout."""
  if plan.platform == "tpu":
    return tpu_fwd.forward(q, k, v, q_seg, kv_seg, tiling=plan.fwd, interpret=plan.interpret)
  return gpu_fwd.forward(q, k, v, q_seg, kv_seg, tiling=plan.fwd,
                         slots=plan.config.max_concurrent_steps, interpret=plan.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(q, k, v, q_seg, kv_seg, plan):
  return _forward(q, k, v, q_seg, kv_seg, plan)[0]


def _core_fwd(q, k, v, q_seg, kv_seg, plan):
  out, lse = _forward(q, k, v, q_seg, kv_seg, plan)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _core_bwd(plan, res, do):
  q, k, v, q_seg, kv_seg, out, lse = res
  delta = row_delta(out, do, plan.platform)
  if plan.platform == "tpu":
    args = (q, k, v, do, lse, delta, q_seg, kv_seg)
    dq = tpu_bwd.backward_dq(*args, tiling=plan.dq, interpret=plan.interpret)
    dk, dv = tpu_bwd.backward_dkv(*args, tiling=plan.dkv, interpret=plan.interpret)
  else:
    args = (q, k, v, do, lse, delta, q_seg, kv_seg)
    kw = dict(slots=plan.config.max_concurrent_steps, wgs=plan.config.compute_wgs_bwd,
              interpret=plan.interpret)
    dq = gpu_bwd.backward_dq(*args, tiling=plan.dq, **kw)
    dk, dv = gpu_bwd.backward_dkv(*args, tiling=plan.dkv, **kw)
  return dq, dk, dv, None, None


_core.defvjp(_core_fwd, _core_bwd)
