"""GPU WKV-7 forward kernel (Pallas Triton lowering): one program per (batch, head).

Legend: layers/__init__.py. Kernel layout is head-major: r, logw, k, v, a, b
[b, h, t, d] (t a multiple of the chunk length B; api.py transposes and pads).
Each program owns one (batch, head) row of the arrays and loops over its chunks
with `lax.fori_loop`, carrying the [d, d] float32 state in registers; each step
loads the chunk's [B, d] tiles, runs chunk.py's matrix form (float32 `tl.dot`s
at IEEE precision, so no TF32 rounding enters the recurrence) and stores y.

This is the `Wkv7Config(gpu_kernel='triton')` kernel; the GPU default is the
Mosaic GPU one (gpu_mosaic.py), and the first hardware run times both. Why keep
Triton: the chunk's matmuls are [B, d] x [d, B] with B = 16..64 rows and
float32 operands, which `tl.dot` takes directly at IEEE float32 precision,
while a Hopper wgmma needs 64-row warpgroup tiles, swizzled SMEM operands and
takes float32 only as TF32 (without transposed operands). The Triton backend
is deprecated upstream in jax 0.11 (still present there). Exporting it from a
CPU host needs `jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")`.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from pallas_kernels.wkv7.chunk import chunk_step

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
NUM_WARPS = 4


def _fwd_kernel(r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref, same_ref, from_state_ref,
                to_end_ref, init_ref, y_ref, final_ref, *starts_ref, chunk: int,
                num_chunks: int):
  def body(c, state):
    if starts_ref:  # the state before each chunk, for the backward kernel
      starts_ref[0][c] = state
    rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    tile = lambda ref: ref[rows, :].astype(jnp.float32)  # noqa: E731
    state, y = chunk_step(state, tile(r_ref), tile(logw_ref), tile(k_ref), tile(v_ref),
                          tile(a_ref), tile(b_ref), same_ref[c].astype(jnp.float32),
                          tile(from_state_ref), tile(to_end_ref))
    y_ref[rows, :] = y.astype(y_ref.dtype)
    return state

  final_ref[...] = lax.fori_loop(0, num_chunks, body, init_ref[...].astype(jnp.float32))


def forward(r, logw, k, v, a, b, same, from_state, to_end, initial_state, *, chunk: int,
            interpret, save_states: bool = False):
  """Forward pass; arguments and returns as tpu.forward (interpret: bool)."""
  batch, heads, length, d = r.shape
  num_chunks = length // chunk
  token = pl.BlockSpec((None, None, length, d), lambda i, h: (i, h, 0, 0))
  state = pl.BlockSpec((None, None, d, d), lambda i, h: (i, h, 0, 0))
  per_token = pl.BlockSpec((None, length, 1), lambda i, h: (i, 0, 0))
  pairs = pl.BlockSpec((None, num_chunks, chunk, chunk), lambda i, h: (i, 0, 0, 0))
  out_specs = [token, state]
  out_shape = [jax.ShapeDtypeStruct(r.shape, r.dtype),
               jax.ShapeDtypeStruct((batch, heads, d, d), jnp.float32)]
  if save_states:
    out_specs.append(pl.BlockSpec((None, None, num_chunks, d, d), lambda i, h: (i, h, 0, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, num_chunks, d, d), jnp.float32))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, chunk=chunk, num_chunks=num_chunks),
      grid=(batch, heads),
      in_specs=[token] * 6 + [pairs, per_token, per_token, state],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=bool(interpret),
      name="wkv7_fwd",
  )(r, logw, k, v, a, b, same, from_state, to_end, initial_state)
