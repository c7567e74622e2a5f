"""Every shipped WKV-7 kernel configuration lowers for its platform, from CPU.

`jax.export` for platforms=['cuda'] runs the Mosaic GPU lowering (gpu_kernel
'mosaic': custom call mosaic_gpu_v2; it also checks shared memory against
Hopper's 227 KiB) or the Pallas Triton one ('triton': the custom call has no
compatibility guarantee, hence the disabled check); for ['tpu'] the Mosaic TPU
lowering, inside an abstract mesh whose AbstractDevice names the chip.
Compilation to PTX / TPU binaries happens on hardware and is not covered.

Default set: h100 (both GPU kernels) and tpu_v5e at both head sizes (32 tiny,
64 published), forward+VJP (two kernels: forward and backward), bf16 and
float32 at chunk 16, and the Mosaic GPU kernels at chunk 32; every other chip
once. The slow sweep: every chip x head size x
dtype x chunk length (x GPU kernel), forward alone and forward+VJP.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels.common import config as chip_config
from pallas_kernels.wkv7 import CHUNK_SIZES, HEAD_SIZES, Wkv7Config, wkv7_pallas
from pallas_kernels.wkv7.gpu import TRITON_CUSTOM_CALL

MOSAIC_GPU_CUSTOM_CALL = "mosaic_gpu_v2"


def export(chip, head_size, dtype, chunk, backward: bool, gpu_kernel="mosaic"):
  """jax.export of wkv7_pallas (and its VJP in all seven inputs) for chip's platform."""
  config = Wkv7Config(chip, chunk, gpu_kernel)
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


def kernel_calls(exported, name=None) -> int:
  """Pallas kernel custom calls (Mosaic TPU, Mosaic GPU or Triton) in an export, or
  those named `name`."""
  text = exported.mlir_module()
  names = [name] if name else ["tpu_custom_call", MOSAIC_GPU_CUSTOM_CALL, TRITON_CUSTOM_CALL]
  return sum(text.count(f"@{n}") for n in names)


DEFAULT = ([(chip, d, dtype) for chip in ("h100", "tpu_v5e") for d in HEAD_SIZES
            for dtype in (jnp.bfloat16, jnp.float32)]
           + [(chip, 64, jnp.bfloat16) for chip in chip_config.CHIPS
              if chip not in ("h100", "tpu_v5e")])


@pytest.mark.parametrize("chip, head_size, dtype", DEFAULT)
def test_lowers_forward_and_vjp(chip, head_size, dtype):
  """Forward and backward kernels (on GPU the default, Mosaic GPU: the forward and the
  backward's reverse state scan)."""
  exported = export(chip, head_size, dtype, 16, backward=True)
  assert kernel_calls(exported) == 2  # fwd, bwd
  if chip_config.CHIPS[chip][0] == "gpu":
    assert kernel_calls(exported, MOSAIC_GPU_CUSTOM_CALL) == 2


@pytest.mark.parametrize("head_size, dtype", [(32, jnp.float32), (64, jnp.bfloat16)])
def test_triton_kernel_still_lowers(head_size, dtype):
  exported = export("h100", head_size, dtype, 16, backward=True, gpu_kernel="triton")
  assert kernel_calls(exported, TRITON_CUSTOM_CALL) == 2


@pytest.mark.parametrize("chip, head_size, dtype, chunk", [
    ("h100", 32, jnp.float32, 32), ("h100", 64, jnp.bfloat16, 32), ("h200", 64, jnp.float32, 32)])
def test_mosaic_gpu_forward_lowers_shipped_shapes(chip, head_size, dtype, chunk):
  """The shipped 32-token chunks through the Mosaic GPU lowering, forward and backward
  (16: test_lowers_forward_and_vjp)."""
  exported = export(chip, head_size, dtype, chunk, backward=True)
  assert kernel_calls(exported, MOSAIC_GPU_CUSTOM_CALL) == 2


@pytest.mark.slow
@pytest.mark.parametrize("chip, head_size, dtype, chunk, gpu_kernel", [
    (chip, d, dtype, chunk, kernel) for chip, d, dtype, chunk, kernel in itertools.product(
        chip_config.CHIPS, HEAD_SIZES, (jnp.bfloat16, jnp.float32), CHUNK_SIZES,
        ("mosaic", "triton"))
    if kernel == "mosaic" or chip_config.CHIPS[chip][0] == "gpu"])
def test_lowers_sweep(chip, head_size, dtype, chunk, gpu_kernel):
  assert kernel_calls(export(chip, head_size, dtype, chunk, False, gpu_kernel)) == 1
  assert kernel_calls(export(chip, head_size, dtype, chunk, True, gpu_kernel)) == 2
