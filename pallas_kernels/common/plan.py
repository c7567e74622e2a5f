"""The call plan the flash and block-sparse wrappers share: checks, tilings, padding.

Legend: layers/__init__.py. The public layout is jax.nn.dot_product_attention's:
q [b, t, h, d], k and v [b, s, k, d] (h % k == 0: MHA, GQA, MQA).

A `Plan` is everything static about one call: the kernel family (from
`config.chip`, never from the device being traced for), each kernel's Tiling
and the padded lengths all three kernels tile, and the interpret mode.
`run_padded` pads t and s to whole blocks (padded keys are masked, padded
queries dropped), moves to the platform's kernel layout, runs a core and undoes
both.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import config as config_lib
from pallas_kernels.common import gpu as gpu_ops
from pallas_kernels.common import gpu_cta
from pallas_kernels.common.config import FlashAttentionConfig
from pallas_kernels.common.masking import Tiling

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything static about one call: kernel family, tilings, interpret mode."""
  platform: str
  fwd: Tiling
  dq: Tiling
  dkv: Tiling
  config: FlashAttentionConfig
  interpret: object  # False, True, or an interpret-params object (hashable).


def static_scale(scale, head_dim: int) -> float:
  """The logit scale as a Python float (default 1 / sqrt(head_dim))."""
  if scale is None:
    scale = 1.0 / math.sqrt(head_dim)
  try:
    return float(scale)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(f"scale={scale!r} must be a Python number (it is static).") from None


def pick_config(config, interpret) -> FlashAttentionConfig:
  """config, or the default one: of the device, or for interpret mode on CPU."""
  if config is None and interpret:
    gpu_params = type(interpret).__name__ == "InterpretGPUParams"
    config = config_lib.default_config("h100" if gpu_params else "tpu_v5e")
  elif config is None:
    config = device_config()
  if not isinstance(config, FlashAttentionConfig):
    raise ValueError(f"config={config!r} must be a FlashAttentionConfig or None.")
  return config


def device_config() -> FlashAttentionConfig:
  """Default config of jax.devices()[0]; error on hosts no kernel targets."""
  device = jax.devices()[0]
  chip = config_lib.chip_of_device(device)
  if chip is None:
    raise ValueError(
        f"config=None and no Pallas flash-attention kernel targets "
        f"{device.device_kind!r}: pass interpret=True on CPU, or an explicit "
        "config=FlashAttentionConfig(chip=...) (e.g. when exporting for another "
        "platform).")
  return config_lib.default_config(chip)


def check_inputs(q, k, v, q_seg, kv_seg):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if jnp.ndim(x) != 4:
      raise ValueError(f"{name} must be 4-D [batch, len, heads, head_dim]; got "
                       f"shape {jnp.shape(x)}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have one shape; got k {k.shape}, v {v.shape}.")
  if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
    raise ValueError(f"k {k.shape} must match q {q.shape} in batch and head_dim.")
  if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
    raise ValueError(f"num_q_heads={q.shape[2]} must be a multiple of "
                     f"num_kv_heads={k.shape[2]} (k.shape[2]).")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
  if jnp.dtype(q.dtype) not in [jnp.dtype(x) for x in _DTYPES]:
    raise ValueError(f"q.dtype={q.dtype} is not supported; use float32, bfloat16 or float16.")
  if q.shape[3] > config_lib.MAX_HEAD_DIM or q.shape[3] == 0:
    raise ValueError(f"head_dim={q.shape[3]} (q.shape[3]) must be in "
                     f"1..{config_lib.MAX_HEAD_DIM}.")
  if (q_seg is None) != (kv_seg is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together "
                     f"(got q_segment_ids={'None' if q_seg is None else 'array'}, "
                     f"kv_segment_ids={'None' if kv_seg is None else 'array'}).")
  if q_seg is not None:
    for name, ids, x in (("q_segment_ids", q_seg, q), ("kv_segment_ids", kv_seg, k)):
      if jnp.shape(ids) != x.shape[:2] or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be int [batch, len] = {x.shape[:2]}; got "
                         f"{jnp.shape(ids)} {ids.dtype}.")


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


_BLOCK_NAMES = ("block_q", "block_kv", "block_q_dq", "block_kv_dq", "block_q_dkv",
                "block_kv_dkv")


def make_plan(cfg, t, s, group, window, has_segments, scale, interpret, dtype):
  """Block sizes per kernel and the padded lengths every kernel can tile.

  TPU blocks shrink to short sequences (to a multiple of 128, or of 8 when
  interpreted); GPU blocks are fixed multiples of 64 (the wgmma tile) and a CTA
  covers 2 (forward) or compute_wgs_bwd (backward) warpgroups' rows.
  """
  if cfg.platform == "tpu":
    align = 8 if interpret else 128
    if not interpret and jnp.dtype(dtype) == jnp.dtype(jnp.float16):
      raise ValueError("q.dtype=float16: the TPU kernel takes float32 or bfloat16.")
    if not interpret:
      for name in _BLOCK_NAMES:
        if getattr(cfg, name) % 128:
          raise ValueError(f"config.{name}={getattr(cfg, name)} must be a multiple "
                           "of 128 for the TPU kernel.")
    clamp = lambda block, n: min(block, round_up(n, align))
    pairs = [(clamp(cfg.block_q, t), clamp(cfg.block_kv, s)),
             (clamp(cfg.block_q_dq, t), clamp(cfg.block_kv_dq, s)),
             (clamp(cfg.block_q_dkv, t), clamp(cfg.block_kv_dkv, s))]
    q_multiple = math.lcm(*(bq for bq, _ in pairs))
    kv_multiple = math.lcm(*(bkv for _, bkv in pairs))
    interpret = freeze_interpret(interpret)
  else:
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      raise ValueError(f"q.dtype={jnp.dtype(dtype)}: the Mosaic GPU kernel takes "
                       "bfloat16 or float16 (wgmma operands).")
    for name in _BLOCK_NAMES:
      if getattr(cfg, name) % 64:
        raise ValueError(f"config.{name}={getattr(cfg, name)} must be a multiple of "
                         "64 for the Mosaic GPU kernel (the wgmma tile).")
    wgs = cfg.compute_wgs_bwd
    pairs = [(cfg.block_q, cfg.block_kv), (cfg.block_q_dq, cfg.block_kv_dq),
             (cfg.block_q_dkv, cfg.block_kv_dkv)]
    q_multiple = math.lcm(gpu_cta.COMPUTE_WGS * cfg.block_q, wgs * cfg.block_q_dq,
                          cfg.block_q_dkv)
    kv_multiple = math.lcm(cfg.block_kv, cfg.block_kv_dq, wgs * cfg.block_kv_dkv)
    if interpret is True:
      interpret = gpu_ops.interpret_params()
    interpret = freeze_interpret(interpret)
  padded_t, padded_s = round_up(t, q_multiple), round_up(s, kv_multiple)
  tilings = [Tiling(block_q=bq, block_kv=bkv, q_len=t, kv_len=s, padded_q_len=padded_t,
                    padded_kv_len=padded_s, window=window, has_segments=has_segments,
                    scale=scale, group=group) for bq, bkv in pairs]
  return Plan(cfg.platform, *tilings, config=cfg, interpret=interpret)


def freeze_interpret(interpret):
  """bool stays bool; a params object must be hashable (frozen dataclasses are)."""
  if isinstance(interpret, (bool, int)):
    return bool(interpret)
  hash(interpret)
  return interpret


def pad_axis(x, axis: int, size: int, mode="constant"):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, mode=mode)


def run_padded(core, q, k, v, q_seg, kv_seg, plan: Plan):
  """Pads (and for TPU transposes to head-major), runs core(q, k, v, q_seg, kv_seg)
  in the kernel layout, undoes both."""
  t, d = q.shape[1], q.shape[3]
  tq, tk = plan.fwd.padded_q_len, plan.fwd.padded_kv_len
  if q_seg is not None:
    # Edge padding keeps per-block segment ranges tight; padded keys are masked
    # by length and padded queries are dropped.
    q_seg = pad_axis(q_seg.astype(jnp.int32), 1, tq, mode="edge")
    kv_seg = pad_axis(kv_seg.astype(jnp.int32), 1, tk, mode="edge")
  if plan.platform == "tpu":
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    q = pad_axis(q, 2, tq)
    k, v = pad_axis(k, 2, tk), pad_axis(v, 2, tk)
    out = core(q, k, v, q_seg, kv_seg)
    return out[:, :, :t].transpose(0, 2, 1, 3)
  # GPU: head_dim to a multiple of 64 (zero columns change no score).
  padded_d = round_up(d, 64)
  q = pad_axis(pad_axis(q, 1, tq), 3, padded_d)
  k = pad_axis(pad_axis(k, 1, tk), 3, padded_d)
  v = pad_axis(pad_axis(v, 1, tk), 3, padded_d)
  out = core(q, k, v, q_seg, kv_seg)
  return out[:, :t, :, :d]


def row_delta(out, do, platform: str):
  """rowsum(do * out) in f32, [b, h, t] from either kernel layout."""
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  # TPU layout [b, h, t, d] gives [b, h, t]; GPU [b, t, h, d] gives [b, t, h].
  return delta if platform == "tpu" else delta.transpose(0, 2, 1)
