"""Every shipped WKV-7 kernel configuration lowers for its platform, from CPU.

`jax.export` for platforms=['cuda'] runs the Pallas Triton lowering (the custom
call has no compatibility guarantee, hence the disabled check); for ['tpu'] the
Mosaic TPU lowering, inside an abstract mesh whose AbstractDevice names the
chip. Compilation to PTX / TPU binaries happens on hardware and is not covered.

Default set: h100 and tpu_v5e at both head sizes (32 tiny, 64 published),
forward+VJP (two kernels: forward and backward), bf16 and float32; every other
chip once. The slow sweep: every chip x
head size x dtype x chunk length, forward alone and forward+VJP.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels.common import config as chip_config
from pallas_kernels.wkv7 import CHUNK_SIZES, HEAD_SIZES, Wkv7Config, wkv7_pallas
from pallas_kernels.wkv7.gpu import TRITON_CUSTOM_CALL


def export(chip, head_size, dtype, chunk, backward: bool):
  """jax.export of wkv7_pallas (and its VJP in all seven inputs) for chip's platform."""
  config = Wkv7Config(chip, chunk)
  platform = "cuda" if config.platform == "gpu" else "tpu"
  b, t, h = 2, 100, 3
  sd = jax.ShapeDtypeStruct
  x = sd((b, t, h, head_size), dtype)
  args = [x] * 6 + [sd((b, h, head_size, head_size), jnp.float32), sd((b, t), jnp.int32)]

  def fn(r, w, k, v, a, bb, state, doc):
    run = lambda *xs: wkv7_pallas(*xs[:6], doc=doc, initial_state=xs[6],  # noqa: E731
                                  config=config)
    if not backward:
      return run(r, w, k, v, a, bb, state)
    out, vjp = jax.vjp(run, r, w, k, v, a, bb, state)
    return out, vjp(out)

  mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
      device_kind=config.device_kind, num_cores=1, platform=platform))
  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
  with use_abstract_mesh(mesh):
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)


def kernel_calls(exported) -> int:
  """Pallas kernel custom calls (Mosaic TPU or Triton) in an export."""
  text = exported.mlir_module()
  return text.count("@tpu_custom_call") + text.count(f"@{TRITON_CUSTOM_CALL}")


DEFAULT = ([(chip, d, dtype) for chip in ("h100", "tpu_v5e") for d in HEAD_SIZES
            for dtype in (jnp.bfloat16, jnp.float32)]
           + [(chip, 64, jnp.bfloat16) for chip in chip_config.CHIPS
              if chip not in ("h100", "tpu_v5e")])


@pytest.mark.parametrize("chip, head_size, dtype", DEFAULT)
def test_lowers_forward_and_vjp(chip, head_size, dtype):
  assert kernel_calls(export(chip, head_size, dtype, 16, backward=True)) == 2  # fwd, bwd


@pytest.mark.slow
@pytest.mark.parametrize("chip, head_size, dtype, chunk", list(itertools.product(
    chip_config.CHIPS, HEAD_SIZES, (jnp.bfloat16, jnp.float32), CHUNK_SIZES)))
def test_lowers_sweep(chip, head_size, dtype, chunk):
  assert kernel_calls(export(chip, head_size, dtype, chunk, backward=False)) == 1
  assert kernel_calls(export(chip, head_size, dtype, chunk, backward=True)) == 2
