"""Mosaic GPU WKV-7 backward: chunk-parallel XLA around a Mosaic GPU reverse scan of dS.

Legend: layers/__init__.py (b batch, h heads, d head size, B chunk length, nb
chunks); layout as gpu_mosaic.py (head-major [b, h, t, d], t whole chunks).

The only sequential part of the backward is the state's cotangent. Inside a
chunk the state enters linearly (chunk.py's matrix form):

    S' = S ⊙ δ + S W + (terms without S)       W = A_sᵀ (I − A_b)⁻ᵀ B_d
    y  = (R_s + R_b (I − A_b)⁻¹ A_s) Sᵀ + (terms without S)

(A_s = a Γ_{t−1} f, R_s = r Γ_t f, B_d = b Γ_B/Γ_j on the last token's document,
δ = Γ_B where the state carries over, else 0). So with dS' the cotangent of the
state after a chunk,

    dS = dS' ⊙ δ + dS' Wᵀ + G,      G = dyᵀ (R_s + R_b (I − A_b)⁻¹ A_s)   [d, d].

The backward runs in three steps:
1. XLA, all chunks at once (float32, full-precision einsums): W and G per chunk.
2. The Mosaic GPU kernel (`_scan_kernel`): one CTA per (batch, head) walks the
   chunks last to first, carrying dS in float32 registers; per chunk one TF32
   wgmma dS'·Wᵀ on a 64 x 64 tile (d = 32 zero-padded, as the forward), W, G
   and δ streamed by TMA through two SMEM slots (the next chunk's copy overlaps
   this one's step); it saves dS' (the cotangent of the state after each
   chunk) and returns the initial state's cotangent.
3. XLA, all chunks at once: chunk.py's `chunk_step_vjp` vmapped over (b, h,
   chunk), from the forward's saved state before each chunk and the dS' of
   step 2: the cotangents of r, log w, k, v, a and b.

This puts the backward's big matmuls (the chunk VJP) in XLA's batched matmuls
and only the recurrence in the kernel. The Triton backward (gpu_bwd.py,
`gpu_kernel='triton'`) runs the whole chunk VJP inside its kernel instead; the
first hardware run says which is faster.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.common.gpu import kernel_interpret
from pallas_kernels.wkv7.chunk import chunk_step_vjp
from pallas_kernels.wkv7.gpu_mosaic import (F32_TRANSFORMS, TILE, TileOps, chunk_log_decays,
                                            pad_tile)
from pallas_kernels.wkv7.reference import unit_lower_inverse

_HIGHEST = lax.Precision.HIGHEST


def _einsum(equation, *operands):
  return jnp.einsum(equation, *operands, precision=_HIGHEST)


def state_maps(r, logw, k, a, b, same, from_state, to_end, dy, *, chunk: int):
  """Per chunk: W, G and δ of the state's cotangent step (see the module doc).

  Args: r, logw, k, a, b, dy head-major [b, h, t, d] (t % chunk == 0); same,
    from_state, to_end as api.doc_masks.
  Returns:
    w float32 [b, h, nb, d, d]: W = A_sᵀ (I − A_b)⁻ᵀ B_d, so dS' Wᵀ is the kernel's
      NT wgmma of dS' and w; g float32 [b, h, nb, d, d]; delta float32 [b, 1, nb, d].
  """
  batch, heads, length, d = r.shape
  nb = length // chunk
  split = lambda x: x.astype(jnp.float32).reshape(batch, heads, nb, chunk, d)  # noqa: E731
  r, logw, k, a, b, dy = (split(x) for x in (r, logw, k, a, b, dy))
  per_token = lambda x: x.reshape(batch, 1, nb, chunk, 1)  # noqa: E731
  f, to_end = per_token(from_state), per_token(to_end)
  same = same[:, None]  # [b, 1, nb, B, B]
  rows = jnp.arange(chunk)[:, None]
  cols = jnp.arange(chunk)[None, :]
  strict, incl_mask = same * (rows > cols), same * (rows >= cols)
  incl, excl, last, middle = chunk_log_decays(logw, chunk)
  key_scale = jnp.exp(middle - incl)  # chunk.py's factoring around the middle
  a_rel, b_rel, r_rel = a * jnp.exp(excl - middle), b * key_scale, r * jnp.exp(incl - middle)
  a_b = _einsum("...tc,...jc->...tj", a_rel, b_rel) * strict
  r_b = _einsum("...tc,...jc->...tj", r_rel, b_rel) * incl_mask
  a_s = a * jnp.exp(excl) * f
  r_s = r * jnp.exp(incl) * f
  b_d = b * jnp.exp(last - incl) * to_end
  solved = _einsum("...ts,...sc->...tc", unit_lower_inverse(a_b), a_s)  # (I − A_b)⁻¹ A_s
  w = _einsum("...tc,...te->...ce", solved, b_d)  # W = A_sᵀ (I − A_b)⁻ᵀ B_d [c, c']
  g = _einsum("...ti,...tc->...ic", dy, r_s + _einsum("...tj,...jc->...tc", r_b, solved))
  keep = f[..., -1, :]  # [b, 1, nb, 1] the last token continues the state
  delta = jnp.exp(last[..., 0, :]) * keep
  return w, g, delta


def _scan_kernel(w_ref, g_ref, delta_ref, d_final_ref, d_after_ref, d_init_ref, w_smem,
                 g_smem, state_smem, delta_smem, bars, *, num_chunks: int, interpret: bool):
  """Per (batch, head): dS from the last chunk to the first. W, G and δ stream through
  two SMEM slots (chunk c + 1's copy, in reverse order, runs during chunk c's step);
  barrier 3·slot + j completes slot's copy j (W, G, δ)."""
  io = TileOps(interpret)
  b, h = lax.axis_index("batch"), lax.axis_index("heads")
  shape = (TILE, TILE)

  def fetch(i):  # the copies of step i (chunk nb − 1 − i) into slot i % 2
    c, slot = num_chunks - 1 - i, lax.rem(i, 2)
    for j, (src, dst) in enumerate(((w_ref, w_smem), (g_ref, g_smem),
                                    (delta_ref, delta_smem))):
      plgpu.copy_gmem_to_smem(src.at[b, h, c], dst.at[slot], bars.at[3 * slot + j])

  plgpu.copy_gmem_to_smem(d_final_ref.at[b, h], state_smem, bars.at[6])
  fetch(jnp.int32(0))
  plgpu.barrier_wait(bars.at[6])

  def step(i, d_state):
    c, slot = num_chunks - 1 - i, lax.rem(i, 2)
    plgpu.copy_smem_to_gmem(state_smem, d_after_ref.at[b, h, c])  # dS' of chunk c

    @pl.when(i + 1 < num_chunks)
    def _next():  # the other slot: step i − 1 finished reading it (fenced)
      fetch(i + 1)

    for j in range(3):
      plgpu.barrier_wait(bars.at[3 * slot + j])
    delta = lax.broadcast_in_dim(io.col_vector(delta_smem.at[slot]), shape, [1])
    # dS' Wᵀ = X Yᵀ with X = dS' (state_smem) and Y = W.
    d_state = d_state * delta + io.mm(state_smem, w_smem.at[slot]) + io.load(g_smem.at[slot])
    plgpu.wait_smem_to_gmem(0)  # dS' has left state_smem
    io.store(state_smem, d_state)
    io.fence()
    return d_state

  lax.fori_loop(0, num_chunks, step, io.load(state_smem))
  plgpu.copy_smem_to_gmem(state_smem, d_init_ref.at[b, h])
  plgpu.wait_smem_to_gmem(0)


def _scan(w, g, delta, d_final, *, interpret):
  """The Mosaic GPU reverse scan: (dS' per chunk [b, h, nb, P, P], dS of the initial state)."""
  batch, heads, nb = w.shape[:3]
  f32_smem = lambda *s: plgpu.SMEM(s, jnp.float32, transforms=F32_TRANSFORMS)  # noqa: E731
  kernel = plgpu.kernel(
      functools.partial(_scan_kernel, num_chunks=nb, interpret=bool(interpret)),
      out_type=[jax.ShapeDtypeStruct((batch, heads, nb, TILE, TILE), jnp.float32),
                jax.ShapeDtypeStruct((batch, heads, TILE, TILE), jnp.float32)],
      scratch_types=[f32_smem(2, TILE, TILE), f32_smem(2, TILE, TILE), f32_smem(TILE, TILE),
                     plgpu.SMEM((2, TILE), jnp.float32), plgpu.Barrier(num_barriers=7)],
      grid=(batch, heads), grid_names=("batch", "heads"), interpret=kernel_interpret(interpret))
  pad_vector = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, TILE - x.shape[-1])])  # noqa: E731
  return kernel(pad_tile(w), pad_tile(g), pad_vector(delta), pad_tile(d_final))


def backward(r, logw, k, v, a, b, same, from_state, to_end, starts, dy, d_final, *, chunk: int,
             interpret):
  """Backward pass; arguments and returns as gpu_bwd.backward (interpret: bool or the
  Mosaic GPU interpreter's params)."""
  batch, heads, length, d = r.shape
  nb = length // chunk
  w, g, delta = state_maps(r, logw, k, a, b, same, from_state, to_end, dy, chunk=chunk)
  d_after, d_init = _scan(w, g, jnp.broadcast_to(delta, (batch, heads, nb, d)), d_final,
                          interpret=interpret)
  d_after = d_after[..., :d, :d]

  tiles = lambda x: x.astype(jnp.float32).reshape(batch, heads, nb, chunk, d)  # noqa: E731
  per_token = lambda x: jnp.broadcast_to(  # noqa: E731
      x.reshape(batch, 1, nb, chunk, 1), (batch, heads, nb, chunk, 1))
  step_vjp = chunk_step_vjp
  for _ in range(3):  # over chunks, heads, batch
    step_vjp = jax.vmap(step_vjp)
  _, *grads = step_vjp(starts, *(tiles(x) for x in (r, logw, k, v, a, b)),
                       jnp.broadcast_to(same[:, None], (batch, heads, nb, chunk, chunk)),
                       per_token(from_state), per_token(to_end), d_after, tiles(dy))
  grads = [x.reshape(batch, heads, length, d) for x in grads]
  return (*grads, d_init[..., :d, :d])
