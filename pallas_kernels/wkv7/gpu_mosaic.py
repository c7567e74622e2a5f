"""Mosaic GPU (Hopper) WKV-7 forward kernel: wgmma on 64 x 64 tiles, TMA, the state in float32.

Legend: layers/__init__.py (b batch, h heads, d head size, B chunk length, nb
chunks); P = 64 is the wgmma tile (64 token rows, 64 channels). Kernel
operands come from api.py's head-major layout ([b, h, t, d], t whole chunks).

One CTA (a single warpgroup) per (batch, head) walks its chunks in order,
carrying the [d, d] state S in float32 registers (and a float32 SMEM copy, the
operand its matmuls read). Each chunk runs chunk.py's matrix form with every
matmul a Hopper wgmma:

    A_k = (a_rel k_relᵀ)⊙strict   A_b = (a_rel b_relᵀ)⊙strict   (and A_bᵀ)
    Uᵀ  = (S a_stateᵀ + Vᵀ A_kᵀ) (I − A_b)⁻ᵀ      (I − A_b)⁻¹ by block doubling (chunk.py)
    y   = r_state Sᵀ + (R_k)V + (R_b)U           R_k, R_b = (r_rel k_relᵀ / b_relᵀ)⊙incl
    S'  = S⊙decay + Vᵀ kdec + Uᵀ bdec

Why this shape of kernel (the wgmma rules, and how the chunk meets them):
- A wgmma's M is 64 rows per warpgroup. The chunk (B = 16 or 32 tokens; 64
  works too) is placed in the top rows of a 64-row tile, zero below; d = 32
  heads are zero-padded to 64 channels (the padded state rows and columns stay
  zero, so the maths is exact). So every matmul is one 64 x 64 x 64 wgmma. We
  chose this over packing 64/B chunks into one tile: the chunks of a tile would
  still need the state of the chunk before, one after another (M = B rows
  again). The cost: 4x (B = 16) or 2x (B = 32) the matmul
  work, 4x more for d = 32 (since the in-chunk inverse became block doubling,
  the chunked form is exact at any B, so running every call as B = 64 chunks
  would remove the first factor: not done yet), and XLA materialises the padded operands the
  kernel streams: 4 token-major [B, 64] and 3 channel-major [64, 64] float32
  tiles per chunk and head (the token-major ones are copied into the top B
  rows of SMEM tiles zeroed once; y leaves as [B, 64]).
- Operands are float32 in SMEM, so the tensor cores run TF32 (10-bit
  mantissa; hardware tolerances say so; the interpreter computes in float32).
  TF32 wgmma takes no transposed operand: every matmul here is C = X Yᵀ with
  both X and Y row-major (K contiguous). Where the maths needs the other
  orientation, the kernel forms the transpose by a matmul (A_bᵀ = b_rel a_relᵀ,
  the block inverse in both orientations, Uᵀ instead of U), and XLA supplies Vᵀ and
  the channel-major write operands kdec, bdec.
- The in-chunk decays (cumulative sums of log w and their exponentials) are
  formed by XLA before the kernel, in float32, per chunk: a_rel = a Γ_{t-1}/Γ_m,
  k_rel, b_rel = (k, b) Γ_m/Γ_j, r_rel = r Γ_t/Γ_m (m the chunk's middle, as
  chunk.py), kdec, bdec = (k, b) Γ_B/Γ_j on the last token's document
  (channel-major), the state decay Γ_B (0 where the document changes) and
  Γ_m. A TF32 cumulative sum would put 1e-3-relative errors into every decay.
  The kernel forms a_state = a_rel Γ_m f and r_state = r_rel Γ_m f (f: the token
  continues the state) itself.
- The carried state never leaves float32: TF32 rounds the copy a matmul reads,
  as the reference CUDA kernels cast their state to the input dtype for dots.

SMEM: 7 input tiles, S, 4 temporaries (float32 64 x 64, 16 KiB each: 192 KiB)
and the per-chunk vectors, within Hopper's 227 KiB: no room for a second set
of input buffers, so the next chunk's copies start as soon as this chunk's
last read of each buffer is done (the pairwise terms free A_REL, the read-out
K_REL, B_REL and R_REL, the state update the channel-major tiles) and overlap
the rest of the chunk's wgmmas.

With save_states the kernel also writes the state before each chunk (float32
[b, h, nb, d, d]), which the backward (gpu_mosaic_bwd.py, or the Triton
gpu_bwd.py: both take the same residuals) reads.
"""

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.common.gpu import Ops, bcast, kernel_interpret

TILE = 64  # P: wgmma rows, and the padded token and channel extent of every tile.
MAX_HEAD_SIZE = TILE
MAX_CHUNK = TILE
# float32 operand tiles: 8 rows x 32 float32 (128 bytes), 128-byte swizzle.
F32_TRANSFORMS = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
_NT = (((1,), (1,)), ((), ()))
# Tiles of the stacked per-chunk input (XLA-side names).
A_REL, K_REL, B_REL, R_REL, V_T, KDEC_T, BDEC_T = range(7)
NUM_TILES = 7
NUM_TOKEN_TILES = 4  # A_REL .. R_REL: token rows (the rest: channel rows)
# Rows of the per-chunk vectors.
FROM_STATE, DOC, MIDDLE_DECAY, STATE_DECAY = range(4)
NUM_VECTORS = 4


def unsupported_reason(head_size: int, chunk_size: int) -> str | None:
  """Why the Mosaic GPU kernel cannot serve these, or None."""
  if head_size > MAX_HEAD_SIZE:
    return f"head size d={head_size} with gpu_kernel='mosaic' (it serves d <= {MAX_HEAD_SIZE})"
  if chunk_size > MAX_CHUNK:
    return f"chunk length {chunk_size} with gpu_kernel='mosaic' (it serves B <= {MAX_CHUNK})"
  return None


def pad_tile(x):
  """[..., rows, cols] zero-padded to [..., TILE, TILE]."""
  pads = [(0, 0)] * (x.ndim - 2) + [(0, TILE - x.shape[-2]), (0, TILE - x.shape[-1])]
  return jnp.pad(x, pads)


def _pad_vector(x, value=0.0):
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, TILE - x.shape[-1])], constant_values=value)


def chunk_log_decays(logw, chunk: int):
  """log Γ per chunk, float32 [b, h, nb, B, d] logw -> (log Γ_t, log Γ_{t-1} [.., B, d],
  log Γ_B and log Γ_m [.., 1, d]: the chunk's last token and its middle, m = B/2 − 1,
  around which chunk.py factors the pairwise decays)."""
  incl = jnp.cumsum(logw, axis=3)
  excl = incl - logw
  return incl, excl, incl[..., -1:, :], incl[..., chunk // 2 - 1:chunk // 2, :]


def chunk_operands(r, logw, k, v, a, b, same, from_state, to_end, *, chunk: int):
  """The kernel's per-chunk inputs, formed by XLA in float32 (see the module doc).

  Args: as gpu.forward's first nine (head-major [b, h, t, d], t % chunk == 0).
  Returns:
    token_tiles float32 [b, h, nb, 4, B, P] (A_REL ... R_REL: token rows, channels
      zero-padded to P) and channel_tiles float32 [b, h, nb, 3, P, P] (V_T, KDEC_T,
      BDEC_T: channel rows, token columns, zero-padded);
    vectors float32 [b, h, nb, 4, P]: per token f and a document label, per
    channel Γ_m and the state decay Γ_B·keep.
  """
  batch, heads, length, d = r.shape
  nb = length // chunk
  split = lambda x: x.astype(jnp.float32).reshape(batch, heads, nb, chunk, d)  # noqa: E731
  r, logw, k, v, a, b = (split(x) for x in (r, logw, k, v, a, b))
  per_token = lambda x: x.astype(jnp.float32).reshape(batch, 1, nb, chunk, 1)  # noqa: E731
  f_tok, to_end = per_token(from_state), per_token(to_end)  # shared by the heads
  incl, excl, last, middle = chunk_log_decays(logw, chunk)
  a_rel = a * jnp.exp(excl - middle)
  key_scale = jnp.exp(middle - incl)
  to_last = jnp.exp(last - incl) * to_end
  pad_channels = lambda x: jnp.pad(x, [(0, 0)] * 4 + [(0, TILE - d)])  # noqa: E731
  token_tiles = jnp.stack([pad_channels(x) for x in (
      a_rel, k * key_scale, b * key_scale, r * jnp.exp(incl - middle))], axis=3)
  channel_tiles = jnp.stack([pad_tile(jnp.swapaxes(x, -1, -2)) for x in (
      v, k * to_last, b * to_last)], axis=3)
  # Documents inside a chunk are runs: label a token by its run's first token.
  first = jnp.argmax(same.astype(bool), axis=-1).astype(jnp.float32)  # [b, nb, B]
  keep = f_tok[..., -1:, :]  # [b, 1, nb, 1, 1] the last token continues the state
  vectors = [jnp.broadcast_to(_pad_vector(f_tok[..., 0]), (batch, heads, nb, TILE)),
             jnp.broadcast_to(_pad_vector(first[:, None], -1.0), (batch, heads, nb, TILE)),
             _pad_vector(jnp.exp(middle[..., 0, :]), 1.0),
             _pad_vector((jnp.exp(last) * keep)[..., 0, :])]
  return token_tiles, channel_tiles, jnp.stack(vectors, axis=3)


def crossing(rows, cols, size: int):
  """bool tile: row in the second and column in the first half of the same 2·size block
  (size a power of two; swap rows and cols for the transposed pattern)."""
  half = size.bit_length() - 1
  same_pair = lax.shift_right_logical(rows, half + 1) == lax.shift_right_logical(cols, half + 1)
  return same_pair & ((lax.shift_right_logical(rows, half) & 1) == 1) & (
      (lax.shift_right_logical(cols, half) & 1) == 0)


def tf32(x):
  """x float32 with the 13 low mantissa bits cleared: what a TF32 tensor core reads."""
  bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFE000)
  return lax.bitcast_convert_type(bits, jnp.float32)


class TileOps:
  """Register <-> SMEM moves and the NT matmul, on hardware or interpreted.

  emulate_tf32 (tests set it): the interpreted matmul truncates its operands to
  TF32 as the hardware does, so the interpreter shows the hardware's rounding.
  """
  emulate_tf32 = False

  def __init__(self, interpret: bool):
    self.interpret = interpret
    self.ops = Ops(interpret=interpret)

  def load(self, ref):
    """A 64 x 64 float32 SMEM tile into registers (wgmma accumulator layout)."""
    if self.interpret:
      return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA)

  def store(self, ref, x):
    ref[...] = x

  def fence(self):
    """Make register stores to SMEM visible to the next wgmma (async proxy)."""
    plgpu.commit_smem()

  def mm(self, x_smem, y_smem):
    """x yᵀ, float32 [P, P]: both operands row-major float32 in SMEM (TF32 wgmma)."""
    if self.interpret:
      x, y = x_smem[...], y_smem[...]
      if self.emulate_tf32:
        x, y = tf32(x), tf32(y)
      return lax.dot_general(x, y, _NT, precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
    return self.ops.matmul_nt(x_smem, y_smem, (TILE, TILE))

  def row_vector(self, ref):
    """[P] broadcastable along a tile's rows: one value per row."""
    return self.ops.load_vector(ref, axis=1)

  def col_vector(self, ref):
    return self.ops.load_vector(ref, axis=0)


def _fwd_kernel(token_ref, channel_ref, vectors_ref, init_ref, y_ref, final_ref, *rest,
                chunk: int,
                num_chunks: int, save_states: bool, interpret: bool):
  if save_states:
    starts_ref, *rest = rest
  inputs, state_smem, tmp, vec, bars = rest
  io = TileOps(interpret)
  ops = io.ops
  b, h = lax.axis_index("batch"), lax.axis_index("heads")
  shape = (TILE, TILE)
  rows, cols = ops.iota(shape, 0), ops.iota(shape, 1)

  def fetch(i, c):
    """TMA of chunk c's tile i (one copy per tile: a copy strides at most 5 dims), or
    of its vectors (i = NUM_TILES), completing on barrier i."""
    if i == NUM_TILES:
      src, dst = vectors_ref.at[b, h, c], vec
    elif i < NUM_TOKEN_TILES:  # the chunk's B rows; the rows below stay zero
      src, dst = token_ref.at[b, h, c, i], inputs.at[i].at[pl.ds(0, chunk)]
    else:
      src, dst = channel_ref.at[b, h, c, i - NUM_TOKEN_TILES], inputs.at[i]
    plgpu.copy_gmem_to_smem(src, dst, bars.at[i])

  def prefetch(c, indices):
    """The next chunk's copies into buffers this chunk has finished reading (its
    wgmmas have completed, its register loads are behind a fence)."""
    @pl.when(c + 1 < num_chunks)
    def _next():
      for i in indices:
        fetch(i, c + 1)

  plgpu.copy_gmem_to_smem(init_ref.at[b, h], state_smem, bars.at[NUM_TILES + 1])
  if chunk < TILE:  # token tiles: rows B.. are never copied to, and must read as zero
    for i in range(NUM_TOKEN_TILES):
      io.store(inputs.at[i], ops.full(shape, 0.0))
    io.fence()
  for i in range(NUM_TILES + 1):
    fetch(i, 0)
  plgpu.barrier_wait(bars.at[NUM_TILES + 1])

  def step(c, state):
    if save_states:  # the state before the chunk (state_smem holds it)
      plgpu.copy_smem_to_gmem(state_smem, starts_ref.at[b, h, c])
    for i in range(NUM_TILES + 1):
      plgpu.barrier_wait(bars.at[i])
    f_row = bcast(io.row_vector(vec.at[FROM_STATE]), shape, 0)
    doc_row = bcast(io.row_vector(vec.at[DOC]), shape, 0)
    doc_col = bcast(io.col_vector(vec.at[DOC]), shape, 1)
    middle = bcast(io.col_vector(vec.at[MIDDLE_DECAY]), shape, 1)
    decay = bcast(io.col_vector(vec.at[STATE_DECAY]), shape, 1)
    same = doc_row == doc_col
    strict, incl, strict_t = same & (rows > cols), same & (rows >= cols), same & (rows < cols)
    masked = lambda keep, x: jnp.where(keep, x, 0.0)  # noqa: E731
    tile = inputs.at

    # Uᵀ: the vectors the tokens remove, (I − A_b)⁻¹ applied from the right.
    a_b = masked(strict, io.mm(tile[A_REL], tile[B_REL]))
    io.store(tmp.at[0], masked(strict, io.mm(tile[A_REL], tile[K_REL])))  # A_k
    io.store(tmp.at[1], io.load(tile[A_REL]) * middle * f_row)  # a_state
    io.fence()
    io.store(tmp.at[3], io.mm(state_smem, tmp.at[1]) + io.mm(tile[V_T], tmp.at[0]))  # rhsᵀ
    # (I − A_b)⁻¹ by block doubling (chunk.py): X ← X + P X with P = X M, M the lower-left
    # quarter of every 2s-block of A_b. The NT matmul wants Xᵀ beside X, kept by
    # Xᵀ ← Xᵀ + Xᵀ Pᵀ; Mᵀ comes from A_bᵀ. A_REL's tile is read for the last time
    # above, so it holds P until the next chunk's copy (P's rows >= B are exactly zero,
    # as the token tiles' padding rows must be: M's rows there are zero).
    a_b_t = masked(strict_t, io.mm(tile[B_REL], tile[A_REL]))
    eye = jnp.where(rows == cols, 1.0, 0.0)
    x = eye + masked(crossing(rows, cols, 1), a_b)
    x_t = eye + masked(crossing(cols, rows, 1), a_b_t)
    prefetch(c, (NUM_TILES,))
    size = 2
    while size < chunk:
      io.store(tmp.at[0], x)
      io.store(tmp.at[1], x_t)
      io.store(tmp.at[2], masked(crossing(cols, rows, size), a_b_t))  # Mᵀ
      io.fence()
      io.store(tile[A_REL], io.mm(tmp.at[0], tmp.at[2]))  # P = X M
      io.fence()
      x = x + io.mm(tile[A_REL], tmp.at[1])  # P X
      x_t = x_t + io.mm(tmp.at[1], tile[A_REL])  # Xᵀ Pᵀ
      size *= 2
    io.store(tmp.at[2], x)
    io.fence()
    prefetch(c, (A_REL,))
    u_t = io.mm(tmp.at[3], tmp.at[2])  # Uᵀ [i, t] = rhsᵀ (I − A_b)⁻ᵀ
    io.store(tmp.at[0], u_t)
    io.store(tmp.at[1], masked(incl, io.mm(tile[R_REL], tile[K_REL])))  # R_k
    io.store(tmp.at[2], masked(incl, io.mm(tile[R_REL], tile[B_REL])))  # R_b
    io.store(tmp.at[3], io.load(tile[R_REL]) * middle * f_row)  # r_state
    io.fence()
    prefetch(c, (K_REL, B_REL, R_REL))
    y = io.mm(tmp.at[3], state_smem) + io.mm(tmp.at[1], tile[V_T]) + io.mm(tmp.at[2], tmp.at[0])
    state = state * decay + io.mm(tile[V_T], tile[KDEC_T]) + io.mm(tmp.at[0], tile[BDEC_T])
    prefetch(c, (V_T, KDEC_T, BDEC_T))
    if save_states:
      plgpu.wait_smem_to_gmem(0)  # the saved state has left state_smem
    io.store(state_smem, state)
    io.store(tmp.at[1], y)
    io.fence()
    plgpu.copy_smem_to_gmem(tmp.at[1].at[pl.ds(0, chunk)], y_ref.at[b, h, c])
    plgpu.wait_smem_to_gmem(0)
    return state

  state = lax.fori_loop(0, num_chunks, step, io.load(state_smem))
  del state  # state_smem holds it
  plgpu.copy_smem_to_gmem(state_smem, final_ref.at[b, h])
  plgpu.wait_smem_to_gmem(0)


def forward(r, logw, k, v, a, b, same, from_state, to_end, initial_state, *, chunk: int,
            interpret, save_states: bool = False):
  """Forward pass; arguments and returns as gpu.forward (interpret: bool or the
  Mosaic GPU interpreter's params)."""
  batch, heads, length, d = r.shape
  num_chunks = length // chunk
  operands = chunk_operands(r, logw, k, v, a, b, same, from_state, to_end, chunk=chunk)
  init = pad_tile(initial_state.astype(jnp.float32))
  state = jax.ShapeDtypeStruct((batch, heads, TILE, TILE), jnp.float32)
  out_type = [jax.ShapeDtypeStruct((batch, heads, num_chunks, chunk, TILE), jnp.float32), state]
  if save_states:
    out_type.append(jax.ShapeDtypeStruct((batch, heads, num_chunks, TILE, TILE), jnp.float32))
  f32_smem = lambda *s: plgpu.SMEM(s, jnp.float32, transforms=F32_TRANSFORMS)  # noqa: E731
  scratch = [f32_smem(NUM_TILES, TILE, TILE), f32_smem(TILE, TILE), f32_smem(4, TILE, TILE),
             plgpu.SMEM((NUM_VECTORS, TILE), jnp.float32),
             plgpu.Barrier(num_barriers=NUM_TILES + 2)]
  kernel = plgpu.kernel(
      functools.partial(_fwd_kernel, chunk=chunk, num_chunks=num_chunks,
                        save_states=save_states, interpret=bool(interpret)),
      out_type=out_type, scratch_types=scratch, grid=(batch, heads),
      grid_names=("batch", "heads"), interpret=kernel_interpret(interpret))
  y, final, *starts = kernel(*operands, init)
  y = y[..., :d].reshape(batch, heads, length, d).astype(r.dtype)
  out = (y, final[:, :, :d, :d])
  return (*out, starts[0][..., :d, :d]) if save_states else out
