"""GPU SSD forward kernel (Pallas on Triton): one program per (batch, head), chunks in a loop.

Legend: layers/__init__.py. Layout is the public, token-major one (Triton reads
any strides, so nothing is transposed): x·dt [b, t, h, d], B and C
[b, t, ng, N], per-token scalars cs [b, t, h] (in-block cumulative log decay)
and doc / keep / to_end [b, t] (float32; see api.chunk_rows), t padded to whole
blocks of B tokens.

A program owns one head of one batch row and walks its blocks in order
(`lax.fori_loop`), carrying the float32 state [N, d] in registers; per block
it does the same three matmuls as the TPU kernel (tpu.py): the masked in-block
"attention" (C·Bᵀ ∘ decay) · (x·dt), the carried-state read-out C · S, and the
state update (to_end ∘ B)ᵀ · (x·dt). The block B is the kernel's own (64 by
default, config.gpu_block), not the model's chunk size: the SSD result does
not depend on the chunking, and a [64, 64] float32 tile plus the [N, d] state
fit one program's registers where a 256-token chunk would spill.

Selected by SsdConfig(gpu_kernel='triton'); the default on Hopper is the
Mosaic GPU kernel (gpu_mosaic.py, wgmma tiles in SMEM fed by a TMA ring),
and both stay so that hardware runs can time them against each other. Here
one Triton program per (b, h) lowers directly; parallelism is b · h programs
(Mamba-2 models have 24 .. 80 heads).
Triton asks for power-of-two tile sizes: d, N and B must be powers of two
(api.py checks; Mamba-2's 64 / 128 and the tiny 32 / 32 are).
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.triton as plgpu_triton
import jax.numpy as jnp

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def dot(a, b, dims):
  """float32-accumulated a·b; float32 operands stay IEEE float32 (no TF32)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def advance(state, x, bmat, cs, keep, to_end):
  """The state [N, d] after one block: decayed (reset at a document start) plus its input."""
  last = lax.broadcasted_iota(jnp.int32, cs.shape, 0) == cs.shape[0] - 1
  cs_last = jnp.sum(jnp.where(last, cs, 0.0))
  survives = jnp.sum(jnp.where(last, keep, 0.0))
  weight = jnp.exp(cs_last - cs) * to_end  # [B]
  weighted_b = (bmat.astype(jnp.float32) * weight[:, None]).astype(x.dtype)
  return state * (jnp.exp(cs_last) * survives) + dot(weighted_b, x, _TN)


def _kernel(x_ref, cs_ref, doc_ref, keep_ref, end_ref, b_ref, c_ref, s0_ref, y_ref, sf_ref,
            *states_ref, block: int, num_blocks: int, save_every: int):
  """One (batch, head): every block in order; states_ref: () or (entering states,), saved
  every `save_every` blocks."""
  idx = lax.broadcasted_iota(jnp.int32, (block,), 0)
  causal = idx[:, None] >= idx[None, :]

  def step(i, state):
    tokens = pl.ds(pl.multiple_of(i * block, block), block)
    x = x_ref[tokens, :]  # [B, d] x·dt
    bmat, cmat = b_ref[tokens, :], c_ref[tokens, :]  # [B, N]
    cs, doc = cs_ref[tokens], doc_ref[tokens]  # [B]
    keep, to_end = keep_ref[tokens], end_ref[tokens]
    if states_ref:
      every = jnp.int32(save_every)  # lax.rem / lax.div: i >= 0 (Triton lowers these plainly).
      @pl.when(lax.rem(i, every) == 0)
      def _():
        states_ref[0][lax.div(i, every)] = state

    visible = causal & (doc[:, None] == doc[None, :])
    gap = jnp.where(visible, cs[:, None] - cs[None, :], 0.0)
    decay = jnp.where(visible, jnp.exp(gap), 0.0)  # [B, B]
    weights = (dot(cmat, bmat, _NT) * decay).astype(x.dtype)
    carried = dot(cmat.astype(jnp.float32), state, _NN)  # [B, d]
    y = dot(weights, x, _NN) + carried * (jnp.exp(cs) * keep)[:, None]
    y_ref[tokens, :] = y.astype(y_ref.dtype)
    return advance(state, x, bmat, cs, keep, to_end)

  state = lax.fori_loop(0, num_blocks, step, s0_ref[...].astype(jnp.float32))
  sf_ref[...] = state


def forward(x_dt, cs, doc, keep, to_end, bmat, cmat, initial_state, *, block: int,
            num_warps: int, interpret, save_states: bool = False, save_every: int = 1):
  """The blocked scan.

  Args:
    x_dt: [b, t, h, d] x·dt in the compute dtype (t padded to a multiple of block).
    cs: float32 [b, t, h] in-block cumulative log decay (inclusive).
    doc, keep, to_end: float32 [b, t].
    bmat, cmat: [b, t, ng, N] in the compute dtype.
    initial_state: float32 [b, h, N, d] (transposed).

  Returns:
    y float32 [b, t, h, d] without the D·x skip; final state float32 [b, h, N, d];
    with save_states, also the state entering every save_every-th block float32
    [b, h, ceil(nb / save_every), N, d] (the backward recomputes the others).
  """
  b, padded, h, d = x_dt.shape
  ng, n = bmat.shape[2], bmat.shape[3]
  group = h // ng
  per_token = pl.BlockSpec((None, padded), lambda i, j: (i, 0))
  in_specs = [
      pl.BlockSpec((None, padded, None, d), lambda i, j: (i, 0, j, 0)),
      pl.BlockSpec((None, padded, None), lambda i, j: (i, 0, j)),
      per_token, per_token, per_token,
      pl.BlockSpec((None, padded, None, n), lambda i, j: (i, 0, j // group, 0)),
      pl.BlockSpec((None, padded, None, n), lambda i, j: (i, 0, j // group, 0)),
      pl.BlockSpec((None, None, n, d), lambda i, j: (i, j, 0, 0)),
  ]
  out_specs = [pl.BlockSpec((None, padded, None, d), lambda i, j: (i, 0, j, 0)),
               pl.BlockSpec((None, None, n, d), lambda i, j: (i, j, 0, 0))]
  out_shape = [jax.ShapeDtypeStruct((b, padded, h, d), jnp.float32),
               jax.ShapeDtypeStruct((b, h, n, d), jnp.float32)]
  if save_states:
    saved = -(-(padded // block) // save_every)
    out_specs.append(pl.BlockSpec((None, None, saved, n, d), lambda i, j: (i, j, 0, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, saved, n, d), jnp.float32))
  return pl.pallas_call(
      functools.partial(_kernel, block=block, num_blocks=padded // block,
                        save_every=save_every),
      grid=(b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="ssd_fwd_gpu",
  )(x_dt, cs, doc, keep, to_end, bmat, cmat, initial_state)
