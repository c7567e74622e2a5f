"""Mosaic TPU WKV-7 backward kernel: a reverse scan over chunks carrying the state's cotangent.

Legend: layers/__init__.py. Layout as tpu.py (head-major [b, h, t, d], t whole
chunks). The grid is (b, h, nb) with the chunk axis "arbitrary" and visited
last to first (the index maps read chunk nb − 1 − c). Each step reads the state
before its chunk (saved by the forward kernel), the chunk's inputs and dy, and
runs chunk.py's `chunk_step_vjp` (the VJP of the chunk's matrix form): it writes
the chunk's input cotangents and carries dS, the cotangent of the state before
the chunk, in a VMEM scratch; after the first chunk dS is the initial state's.
"""

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.common.tpu import compiler_params
from pallas_kernels.wkv7.chunk import chunk_step_vjp


def _bwd_kernel(r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref, same_ref, from_state_ref,
                to_end_ref, start_ref, dy_ref, d_final_ref, dr_ref, dlogw_ref, dk_ref, dv_ref,
                da_ref, db_ref, d_init_ref, d_state_ref, *, num_chunks: int):
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _init():
    d_state_ref[...] = d_final_ref[...]

  f32 = lambda ref: ref[...].astype(jnp.float32)  # noqa: E731
  d_state, *grads = chunk_step_vjp(
      start_ref[...], f32(r_ref), f32(logw_ref), f32(k_ref), f32(v_ref), f32(a_ref), f32(b_ref),
      f32(same_ref), f32(from_state_ref), f32(to_end_ref), d_state_ref[...], f32(dy_ref))
  d_state_ref[...] = d_state
  for ref, grad in zip((dr_ref, dlogw_ref, dk_ref, dv_ref, da_ref, db_ref), grads):
    ref[...] = grad

  @pl.when(step == num_chunks - 1)
  def _final():
    d_init_ref[...] = d_state


def backward(r, logw, k, v, a, b, same, from_state, to_end, starts, dy, d_final, *, chunk: int,
             interpret):
  """Backward pass.

  Args:
    r, logw, k, v, a, b, same, from_state, to_end: as tpu.forward.
    starts: float32 [b, h, nb, d, d] the state before each chunk (forward, save_states).
    dy: [b, h, t, d] the cotangent of y; d_final: float32 [b, h, d, d] of the final state.
  Returns:
    (dr, dlogw, dk, dv, da, db float32 [b, h, t, d], d_initial_state float32 [b, h, d, d]).
  """
  batch, heads, length, d = r.shape
  num_chunks = length // chunk
  last = num_chunks - 1
  token = pl.BlockSpec((None, None, chunk, d), lambda i, h, c: (i, h, last - c, 0))
  state = pl.BlockSpec((None, None, d, d), lambda i, h, c: (i, h, 0, 0))
  per_token = pl.BlockSpec((None, chunk, 1), lambda i, h, c: (i, last - c, 0))
  pairs = pl.BlockSpec((None, None, chunk, chunk), lambda i, h, c: (i, last - c, 0, 0))
  start = pl.BlockSpec((None, None, None, d, d), lambda i, h, c: (i, h, last - c, 0, 0))
  grad = jax.ShapeDtypeStruct(r.shape, jnp.float32)
  return pl.pallas_call(
      functools.partial(_bwd_kernel, num_chunks=num_chunks),
      grid=(batch, heads, num_chunks),
      in_specs=[token] * 6 + [pairs, per_token, per_token, start, token, state],
      out_specs=[token] * 6 + [state],
      out_shape=[grad] * 6 + [jax.ShapeDtypeStruct((batch, heads, d, d), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((d, d), jnp.float32)],
      compiler_params=compiler_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="wkv7_bwd",
  )(r, logw, k, v, a, b, same, from_state, to_end, starts, dy, d_final)
