"""Every shipped SSD configuration lowers for its platform, from CPU.

`jax.export` for platforms=['tpu'] runs the Pallas -> Mosaic TPU lowering
inside an abstract mesh whose AbstractDevice names the chip; for ['cuda'] the
Pallas -> Mosaic GPU lowering of the forward (gpu_kernel='mosaic': wgmma shapes
and operand layouts, and shared memory against Hopper's 227 KiB, are checked
here) and the Pallas -> Triton lowering of the backward, or of both with
gpu_kernel='triton' (the Triton custom call, __gpu$xla.gpu.triton, has no
export-compatibility guarantee, so that safety check is disabled here: these
exports are checked, never serialized). Compilation to TPU binaries / PTX
happens on hardware and is not covered.

Configurations: the tiny Mamba (head_dim 32, state 32, chunk 64) and Mamba-2's
default shapes (head_dim 64, state 128, chunk 256), bfloat16, packed documents
and an initial state, t not a multiple of the chunk. Default set: both configs
on h100 and tpu_v5e, forward + VJP (the forward and backward kernels), and the
Mamba-2 shapes once on every other chip; the slow sweep covers every chip x
config, forward alone and forward + VJP.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels.common import config as config_lib
from pallas_kernels.ssd import SsdConfig, ssd

# name -> (heads, head_dim d, state size N, groups ng, chunk).
SHIPPED = {"tiny": (8, 32, 32, 1, 64), "mamba2": (24, 64, 128, 1, 256)}
_TRITON = "__gpu$xla.gpu.triton"


def export(chip: str, shape: str, backward: bool, dtype=jnp.bfloat16, gpu_kernel="mosaic"):
  """jax.export of the SSD kernel (and its VJP) for chip's platform."""
  h, d, n, ng, chunk = SHIPPED[shape]
  b, t = 2, 1000
  sd = jax.ShapeDtypeStruct
  args = [sd((b, t, h, d), dtype), sd((b, t, h), jnp.float32), sd((h,), jnp.float32),
          sd((b, t, ng, n), dtype), sd((b, t, ng, n), dtype),
          sd((h,), jnp.float32), sd((b, h, d, n), jnp.float32)]
  ids = sd((b, t), jnp.int32)
  config = SsdConfig(chip, gpu_kernel=gpu_kernel)

  def scan(x, dt, a, bmat, cmat, d_skip, state0, segment_ids):
    return ssd(x, dt, a, bmat, cmat, d_skip, chunk_size=chunk, segment_ids=segment_ids,
               initial_state=state0, config=config)

  def fn(*args):
    *diff, segment_ids = args
    if not backward:
      return scan(*diff, segment_ids)
    out, vjp = jax.vjp(lambda *p: scan(*p, segment_ids), *diff)
    return out, vjp(out)

  platform = "cuda" if config.platform == "gpu" else "tpu"
  mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
      device_kind=config_lib.CHIPS[chip][2], num_cores=1, platform=platform))
  checks = [jax.export.DisabledSafetyCheck.custom_call(_TRITON)]
  with use_abstract_mesh(mesh):
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
        *args, ids)


def kernel_calls(exported) -> int:
  """Pallas kernel custom calls (Mosaic TPU, Mosaic GPU or Triton) in an export."""
  text = exported.mlir_module()
  return sum(text.count(f"@{name}") for name in ("tpu_custom_call", "mosaic_gpu_v2", _TRITON))


def mosaic_gpu_calls(exported) -> int:
  return exported.mlir_module().count("@mosaic_gpu_v2")


DEFAULT = ([(chip, shape) for chip in ("h100", "tpu_v5e") for shape in SHIPPED]
           + [(chip, "mamba2") for chip in config_lib.CHIPS if chip not in ("h100", "tpu_v5e")])


@pytest.mark.parametrize("chip, shape", DEFAULT)
def test_lowers(chip, shape):
  # Two kernels: the forward (saving the chunk states) and the reverse scan; on GPU both
  # Mosaic GPU (bfloat16).
  exported = export(chip, shape, backward=True)
  assert kernel_calls(exported) == 2
  assert mosaic_gpu_calls(exported) == (2 if SsdConfig(chip).platform == "gpu" else 0)


@pytest.mark.parametrize("shape", sorted(SHIPPED))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("gpu_kernel", ["mosaic", "triton"])
def test_gpu_kernels_lower(gpu_kernel, dtype, shape):
  """Both GPU kernels, both dtypes, forward alone and forward + VJP, on h200.

  Mosaic: the forward, and the backward for 16-bit inputs (float32: Triton's).
  """
  if gpu_kernel == "triton" and dtype == jnp.bfloat16:
    pytest.skip("test_lowers covers it (h100: the same lowering)")
  mosaic = gpu_kernel == "mosaic"
  exported = export("h200", shape, backward=False, dtype=dtype, gpu_kernel=gpu_kernel)
  assert (kernel_calls(exported), mosaic_gpu_calls(exported)) == (1, int(mosaic))
  exported = export("h200", shape, backward=True, dtype=dtype, gpu_kernel=gpu_kernel)
  mosaic_calls = (2 if dtype == jnp.bfloat16 else 1) if mosaic else 0
  assert (kernel_calls(exported), mosaic_gpu_calls(exported)) == (2, mosaic_calls)


@pytest.mark.slow
@pytest.mark.parametrize("chip, shape", list(itertools.product(config_lib.CHIPS, SHIPPED)))
def test_lowers_sweep(chip, shape):
  assert kernel_calls(export(chip, shape, backward=False)) == 1
  assert kernel_calls(export(chip, shape, backward=True)) == 2
