"""Helpers shared by the kernel tests: inputs, fwd+bwd runs, exports, the hardware chip.

Legend: layers/__init__.py; the keyword kh is k, the kv heads.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels.common import config as config_lib

# Interpreted kernels compile to large HLO; optimizing it costs more than it saves.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def hardware_chip(platform: str) -> str:
  """This machine's kernel chip of `platform` ('gpu' | 'tpu'); skips the test elsewhere."""
  device = jax.devices()[0]
  chip = config_lib.chip_of_device(device)
  if chip is None or config_lib.CHIPS[chip][0] != platform:
    pytest.skip(f"needs a {platform.upper()} kernel target; have {device.device_kind}")
  return chip


def packed_ids(key, b: int, n: int, num_docs: int):
  """int32 [b, n]: num_docs contiguous documents of random lengths per row."""
  cuts = jnp.sort(jax.random.randint(key, (b, num_docs - 1), 1, n), axis=1)
  return jnp.sum(jnp.arange(n)[None, :, None] >= cuts[:, None, :], axis=-1).astype(jnp.int32)


def random_attention_inputs(seed: int, *, b, t, s, h, kh, d, dtype, segments: int = 0):
  """((q [b, t, h, d], k, v [b, s, kh, d]), do like q, segment-id kwargs), in dtype.

  segments > 0 packs that many documents per row (the same ids for q and kv
  when t == s).
  """
  keys = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, s, kh, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, s, kh, d), jnp.float32)
  do = jax.random.normal(keys[3], q.shape, jnp.float32)
  ids = {}
  if segments:
    ids["q_segment_ids"] = packed_ids(keys[4], b, t, segments)
    ids["kv_segment_ids"] = (ids["q_segment_ids"] if s == t else
                             packed_ids(keys[5], b, s, segments))
  cast = lambda x: x.astype(dtype)  # noqa: E731
  return (cast(q), cast(k), cast(v)), cast(do), ids


def value_and_grads(fn, args, do):
  """(out, dq, dk, dv) of fn(q, k, v) against cotangent do, compiled once."""
  def both(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))
  return jax.jit(both).lower(*args, do).compile(FAST_COMPILE)(*args, do)


def export_for_chip(chip: str, attend, args, *, backward: bool = True):
  """jax.export of attend(q, k, v, *rest) (and its VJP in q, k, v) for chip's platform.

  Runs on this CPU machine inside an abstract mesh whose AbstractDevice names
  the chip (some TPU lowering rules ask for the device kind). `args` are
  ShapeDtypeStructs: q, k, v, then the rest.
  """
  cfg = config_lib.default_config(chip)
  platform = "cuda" if cfg.platform == "gpu" else "tpu"

  def fn(q, k, v, *rest):
    if not backward:
      return attend(q, k, v, *rest)
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, *rest), q, k, v)
    return out, vjp(out)

  mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
      device_kind=cfg.device_kind, num_cores=1, platform=platform))
  with use_abstract_mesh(mesh):
    return jax.export.export(jax.jit(fn), platforms=[platform])(*args)


def kernel_calls(exported) -> int:
  """Number of Pallas kernel custom calls (Mosaic TPU or Mosaic GPU) in an export."""
  text = exported.mlir_module()
  return text.count("@tpu_custom_call") + text.count("@mosaic_gpu_v2")
