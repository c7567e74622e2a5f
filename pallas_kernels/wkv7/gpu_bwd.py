"""GPU WKV-7 backward kernel (Pallas Triton): a reverse loop over chunks per (batch, head).

Legend: layers/__init__.py. Layout as gpu.py. Each program walks its chunks
last to first, carrying dS (the cotangent of the state before the chunk) in
registers: it loads the state before the chunk (saved by the forward kernel),
the chunk's inputs and dy, runs chunk.py's `chunk_step_vjp` (the VJP of the
chunk's matrix form) and stores the chunk's input cotangents; after the first
chunk dS is the initial state's.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from pallas_kernels.wkv7.chunk import chunk_step_vjp
from pallas_kernels.wkv7.gpu import NUM_WARPS


def _bwd_kernel(r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref, same_ref, from_state_ref,
                to_end_ref, starts_ref, dy_ref, d_final_ref, dr_ref, dlogw_ref, dk_ref, dv_ref,
                da_ref, db_ref, d_init_ref, *, chunk: int, num_chunks: int):
  def body(step, d_state):
    c = num_chunks - 1 - step
    rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    tile = lambda ref: ref[rows, :].astype(jnp.float32)  # noqa: E731
    d_state, *grads = chunk_step_vjp(
        starts_ref[c], tile(r_ref), tile(logw_ref), tile(k_ref), tile(v_ref), tile(a_ref),
        tile(b_ref), same_ref[c].astype(jnp.float32), tile(from_state_ref), tile(to_end_ref),
        d_state, tile(dy_ref))
    for ref, grad in zip((dr_ref, dlogw_ref, dk_ref, dv_ref, da_ref, db_ref), grads):
      ref[rows, :] = grad
    return d_state

  d_init_ref[...] = lax.fori_loop(0, num_chunks, body, d_final_ref[...])


def backward(r, logw, k, v, a, b, same, from_state, to_end, starts, dy, d_final, *, chunk: int,
             interpret):
  """Backward pass; arguments and returns as tpu_bwd.backward (interpret: bool)."""
  batch, heads, length, d = r.shape
  num_chunks = length // chunk
  token = pl.BlockSpec((None, None, length, d), lambda i, h: (i, h, 0, 0))
  state = pl.BlockSpec((None, None, d, d), lambda i, h: (i, h, 0, 0))
  per_token = pl.BlockSpec((None, length, 1), lambda i, h: (i, 0, 0))
  pairs = pl.BlockSpec((None, num_chunks, chunk, chunk), lambda i, h: (i, 0, 0, 0))
  starts_spec = pl.BlockSpec((None, None, num_chunks, d, d), lambda i, h: (i, h, 0, 0, 0))
  grad = jax.ShapeDtypeStruct(r.shape, jnp.float32)
  return pl.pallas_call(
      functools.partial(_bwd_kernel, chunk=chunk, num_chunks=num_chunks),
      grid=(batch, heads),
      in_specs=[token] * 6 + [pairs, per_token, per_token, starts_spec, token, state],
      out_specs=[token] * 6 + [state],
      out_shape=[grad] * 6 + [jax.ShapeDtypeStruct((batch, heads, d, d), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=bool(interpret),
      name="wkv7_bwd",
  )(r, logw, k, v, a, b, same, from_state, to_end, starts, dy, d_final)
