"""Mosaic TPU WKV-7 forward kernel: one program per (batch, head), a sequential grid axis of chunks.

Legend: layers/__init__.py. Kernel layout is head-major: r, logw, k, v, a, b
[b, h, t, d] (t a multiple of the chunk length B; api.py transposes and pads).
The grid is (b, h, nb) with the chunk axis last and "arbitrary": Pallas streams
chunk i's [B, d] blocks into VMEM while the [d, d] float32 state stays in a VMEM
scratch across the chunks of one (batch, head). Each step runs chunk.py's matrix
form; the final state is written at the last chunk (its block index is the same
for every chunk, so it is copied out once).
"""

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.common.tpu import compiler_params
from pallas_kernels.wkv7.chunk import chunk_step


def _fwd_kernel(r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref, same_ref, from_state_ref,
                to_end_ref, init_ref, y_ref, final_ref, *rest, num_chunks: int):
  *starts_ref, state_ref = rest
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _init():
    state_ref[...] = init_ref[...]

  if starts_ref:  # the state before each chunk, for the backward kernel
    starts_ref[0][...] = state_ref[...]

  f32 = lambda ref: ref[...].astype(jnp.float32)  # noqa: E731
  state, y = chunk_step(state_ref[...], f32(r_ref), f32(logw_ref), f32(k_ref), f32(v_ref),
                        f32(a_ref), f32(b_ref), f32(same_ref), f32(from_state_ref),
                        f32(to_end_ref))
  state_ref[...] = state
  y_ref[...] = y.astype(y_ref.dtype)

  @pl.when(c == num_chunks - 1)
  def _final():
    final_ref[...] = state


def forward(r, logw, k, v, a, b, same, from_state, to_end, initial_state, *, chunk: int,
            interpret, save_states: bool = False):
  """Forward pass.

  Args:
    r, logw, k, v, a, b: [b, h, t, d] (t % chunk == 0; logw float32, the rest one dtype).
    same: float32 [b, nb, B, B]; from_state, to_end: float32 [b, t, 1] (api.doc_masks).
    initial_state: float32 [b, h, d, d].
    interpret: False, True, or pltpu.InterpretParams.
    save_states: also return the state before each chunk (the backward's residual).
  Returns:
    (y [b, h, t, d] in r.dtype, final state float32 [b, h, d, d]), then with
    save_states the states before each chunk float32 [b, h, nb, d, d].
  """
  batch, heads, length, d = r.shape
  num_chunks = length // chunk
  token = pl.BlockSpec((None, None, chunk, d), lambda i, h, c: (i, h, c, 0))
  state = pl.BlockSpec((None, None, d, d), lambda i, h, c: (i, h, 0, 0))
  per_token = pl.BlockSpec((None, chunk, 1), lambda i, h, c: (i, c, 0))
  pairs = pl.BlockSpec((None, None, chunk, chunk), lambda i, h, c: (i, c, 0, 0))
  out_specs = [token, state]
  out_shape = [jax.ShapeDtypeStruct(r.shape, r.dtype),
               jax.ShapeDtypeStruct((batch, heads, d, d), jnp.float32)]
  if save_states:
    out_specs.append(pl.BlockSpec((None, None, None, d, d), lambda i, h, c: (i, h, c, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, num_chunks, d, d), jnp.float32))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, num_chunks=num_chunks),
      grid=(batch, heads, num_chunks),
      in_specs=[token] * 6 + [pairs, per_token, per_token, state],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((d, d), jnp.float32)],
      compiler_params=compiler_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="wkv7_fwd",
  )(r, logw, k, v, a, b, same, from_state, to_end, initial_state)
