"""GPU SSD forward kernel on Mosaic GPU (Hopper): TMA ring, wgmma, one CTA per (batch, head).

The backward is gpu_mosaic_bwd.py for 16-bit inputs, the Triton gpu_bwd.py for
float32 (see there why); api.py picks, and saves the states either reads.

Legend: layers/__init__.py; T = BLOCK = 64 tokens per loop step (one wgmma M
tile), dp / Np the head dim and state size rounded up to a multiple of 64.

A CTA owns one head of one batch row: one compute warpgroup walks its blocks
of T tokens in order, carrying the float32 state S [dp, Np] in registers (the
wgmma accumulator layout), while a memory warpgroup (common.gpu.produce_ring)
streams each block's operands into a ring of SMEM slots by TMA: (x·dt)ᵀ
[dp, T], B [T, Np], Bᵀ [Np, T], C [T, Np] and five per-token float32 rows
[5, T] (cs, document index, e, w, and the block's gate g; see below). Per
block, with M[i, j] = [j <= i, same document] · exp(cs_i - cs_j):

    scores = C Bᵀ                         wgmma  [T, T]
    W      = scores ∘ M                   registers -> SMEM (compute dtype)
    Y      = e ∘ (C Sᵀ) + W X             wgmma  [T, dp]  (S -> SMEM in the compute dtype)
    S      = g · S + Xᵀ (w ∘ B)           wgmma  [dp, Np] (w ∘ Bᵀ -> SMEM)

with e_i = exp(cs_i) · keep_i, w_j = exp(cs_last - cs_j) · to_end_j and
g = exp(cs_last) · survives (api.chunk_rows' scalars, combined in XLA).

wgmma constraints this layout answers: M tiles of 64 rows per warpgroup
(T = 64; the state update's M is dp, so d and N are zero-padded to multiples of
64 in XLA: the tiny model's 32 / 32 become 64 / 64, which adds zeros, not
error); operands bf16 / f16, or float32 run as TF32 on hardware (about 10
mantissa bits: float32 results are TF32-accurate, like XLA's default GPU dot
precision, not IEEE float32 as the Triton kernel's HIGHEST dots); TF32 allows
no transposed operand, so every product here is A·Bᵀ with both operands
K-major in SMEM (hence the separately streamed Xᵀ and Bᵀ), and A is read from
SMEM (TF32 cannot take A from registers). The carried state is cast to the
compute dtype for its read-out C·Sᵀ, as mamba_ssm's kernels cast states for
their dots; the state itself stays float32 in registers. Shared memory: a
float32 Mamba-2 head (d 64, N 128) takes one ring slot (~210 KiB of the 227);
16-bit inputs take two (`smem_bytes`, `slots_for`).

Interpreted (jax's Mosaic GPU interpreter on CPU, `interpret` true), the
wgmmas and layout-annotated loads become plain jnp on SMEM loads (`MosaicOps`,
which extends common.gpu.Ops); everything else (TMA ring, barriers, masks, stores) is
the same code.
"""

import dataclasses
import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.common.gpu import Ops, Stream, bcast
from pallas_kernels.common.gpu import kernel_interpret, produce_ring

BLOCK = 64  # Tokens per step: one wgmma M tile.
ROWS = 5  # Per-token float32 rows: cs, doc, e, w, gate.
SMEM_LIMIT = 227 * 1024  # Hopper's shared memory per CTA (what the lowering checks).
_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))
BARRIER_BYTES = 1024  # Headroom for barriers and alignment.


def padded(size: int) -> int:
  """A head dim or state size rounded up to whole 64-element tiles."""
  return -(-size // 64) * 64


def transforms(dtype):
  """wgmma operand tiles: 8 rows x 128 bytes, 128-byte swizzle (64 bf16, 32 f32 columns)."""
  return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(128))


def tiled_smem(shape, dtype):
  """An SMEM scratch type in wgmma operand tiles for `dtype`."""
  return plgpu.SMEM(shape, dtype, transforms=transforms(dtype))


def smem_bytes(head_dim: int, state_size: int, dtype, slots: int) -> int:
  """Shared memory of one CTA: `slots` ring slots plus the working tiles."""
  dp, np_, t = padded(head_dim), padded(state_size), BLOCK
  item = jnp.dtype(dtype).itemsize
  slot = item * (dp * t + 3 * t * np_) + 4 * ROWS * t
  work = item * (t * t + dp * np_ + np_ * t) + 4 * t * dp  # W, S, w∘Bᵀ, y (float32).
  state_stage = 0 if jnp.dtype(dtype) == jnp.float32 else 4 * dp * np_  # f32: S is it.
  return slots * slot + work + state_stage + BARRIER_BYTES


def ring_depth(bytes_of, head_dim: int, state_size: int, dtype) -> int:
  """2 ring slots where `bytes_of(head_dim, state_size, dtype, slots)` fits shared memory,
  else 1; 0 where not even one fits."""
  for slots in (2, 1):
    if bytes_of(head_dim, state_size, dtype, slots) <= SMEM_LIMIT:
      return slots
  return 0


def slots_for(head_dim: int, state_size: int, dtype) -> int:
  """The forward's ring depth (`ring_depth` of `smem_bytes`)."""
  return ring_depth(smem_bytes, head_dim, state_size, dtype)


@dataclasses.dataclass(frozen=True)
class MosaicOps(Ops):
  """common.gpu.Ops plus the wgmma forms these kernels need: NT with TF32-safe operands,
  accumulation, and (16-bit only) a register A operand or an MN-major B."""

  def nt(self, a_smem, b_smem, acc=None):
    """float32 a · bᵀ (+ acc): a [m, k], b [n, k] in SMEM, both K-major (TF32-safe)."""
    return self.mm(a_smem, b_smem, transpose_b=True, acc=acc)

  def mm(self, a, b_smem, *, transpose_b: bool, acc=None, a_in_registers: bool = False):
    """float32 a · b, or a · bᵀ with transpose_b (+ acc).

    a: an SMEM ref [m, k], or with a_in_registers a 16-bit register tile;
    b_smem: [k, n], or [n, k] with transpose_b. Only the K-major form (SMEM
    a, transpose_b) serves float32 (TF32) operands.
    """
    if self.interpret:
      a_val = a if a_in_registers else a[...]
      b_val = b_smem[...]
      dims = _NT if transpose_b else _NN
      out = lax.dot_general(a_val, b_val, dims, preferred_element_type=jnp.float32)
      return out if acc is None else acc + out
    b_op = plgpu.transpose_ref(b_smem, (1, 0)) if transpose_b else b_smem
    shape = (a.shape[0], b_smem.shape[0] if transpose_b else b_smem.shape[1])
    if acc is None:
      def fresh(acc_ref):
        plgpu.wgmma(acc_ref, a, b_op)
        return acc_ref[...]
      return pl.run_scoped(fresh, plgpu.ACC(shape, jnp.float32))

    def accumulate(acc_ref):
      plgpu.wgmma(acc_ref, a, b_op)
    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


@dataclasses.dataclass(frozen=True)
class Ring:
  """The SMEM ring of one CTA: a slot per in-flight block of every stream."""
  xt: object  # [slots, dp, T]
  b: object  # [slots, T, Np]
  bt: object  # [slots, Np, T]
  c: object  # [slots, T, Np]
  rows: object  # [slots, ROWS, T] float32
  ready: tuple  # One barrier array [slots] per stream, in the order above.
  consumed: object  # [slots]: the compute warpgroup is done with the slot.

  def streams(self, refs, batch, head, group: int):
    """The memory warpgroup's streams over GMEM refs (xt, b, bt, c, rows)."""
    xt_ref, b_ref, bt_ref, c_ref, rows_ref = refs
    g = lax.div(head, jnp.int32(group))
    tokens = lambda i: pl.ds(i * BLOCK, BLOCK)  # noqa: E731
    sources = [lambda i: xt_ref.at[batch, head, :, tokens(i)],
               lambda i: b_ref.at[batch, tokens(i), g],
               lambda i: bt_ref.at[batch, g, :, tokens(i)],
               lambda i: c_ref.at[batch, tokens(i), g],
               lambda i: rows_ref.at[batch, head, :, tokens(i)]]
    rings = (self.xt, self.b, self.bt, self.c, self.rows)
    return [Stream(src, ring, ready, self.consumed if k == 0 else None)
            for k, (src, ring, ready) in enumerate(zip(sources, rings, self.ready))]


def block_weights(ring: Ring, slot, ops: MosaicOps):
  """W = (C Bᵀ) ∘ M [T, T] float32 and the per-row / per-column scalars of the block.

  Returns (W, e per row, w per column, gate scalar).
  """
  rows = ring.rows.at[slot]
  cs_row, cs_col = ops.load_vector(rows.at[0], 1), ops.load_vector(rows.at[0], 0)
  doc_row, doc_col = ops.load_vector(rows.at[1], 1), ops.load_vector(rows.at[1], 0)
  e_row, w_col = ops.load_vector(rows.at[2], 1), ops.load_vector(rows.at[3], 0)
  gate = rows[4, 0]
  shape = (BLOCK, BLOCK)
  plgpu.barrier_wait(ring.ready[1].at[slot])
  plgpu.barrier_wait(ring.ready[3].at[slot])
  scores = ops.nt(ring.c.at[slot], ring.b.at[slot])
  visible = ((ops.iota(shape, 0) >= ops.iota(shape, 1))
             & (bcast(doc_row, shape, 0) == bcast(doc_col, shape, 1)))
  gap = jnp.where(visible, bcast(cs_row, shape, 0) - bcast(cs_col, shape, 1), 0.0)
  return jnp.where(visible, scores * jnp.exp(gap), 0.0), e_row, w_col, gate


def _kernel(xt_ref, b_ref, bt_ref, c_ref, rows_ref, s0_ref, y_ref, sf_ref, *rest,
            num_blocks: int, group: int, slots: int, save_every: int, save: bool,
            stage_is_state: bool, ops: MosaicOps):
  """stage_is_state: float32 inputs, where S's own SMEM tile stages the float32 state
  (no separate staging tile in the scratch)."""
  states_ref = rest[0] if save else None
  scratch = rest[1:] if save else rest
  (xt_ring, b_ring, bt_ring, c_ring, rows_ring, w_smem, s_smem, wbt_smem, y_smem,
   *rest) = scratch
  stage, bars = (s_smem, rest) if stage_is_state else (rest[0], rest[1:])
  xt_ready, b_ready, bt_ready, c_ready, rows_ready, consumed, s0_bar = bars
  ring = Ring(xt_ring, b_ring, bt_ring, c_ring, rows_ring,
              (xt_ready, b_ready, bt_ready, c_ready, rows_ready), consumed)
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  wg = lax.axis_index("wg")
  dtype = xt_ring.dtype
  dp, np_ = s_smem.shape

  def write_state(state, dst):
    """Copy float32 state [dp, Np] to GMEM `dst` through the staging tile."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    stage[...] = state
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(stage, dst)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  @pl.when(wg == 0)
  def _compute():
    ops.set_registers(compute=True)
    plgpu.copy_gmem_to_smem(s0_ref.at[batch, head], stage, s0_bar.at[0])
    plgpu.barrier_wait(s0_bar.at[0])
    state0 = stage[...]

    def step(i, state):
      slot = lax.rem(i, jnp.int32(slots))
      if save:
        every = jnp.int32(save_every)
        pl.when(lax.rem(i, every) == 0)(
            lambda: write_state(state, states_ref.at[batch, head, lax.div(i, every)]))
      plgpu.barrier_wait(rows_ready.at[slot])
      weights, e_row, w_col, gate = block_weights(ring, slot, ops)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # y_smem (and stage) are free.
      w_smem[...] = weights.astype(dtype)
      s_smem[...] = state.astype(dtype)
      plgpu.barrier_wait(bt_ready.at[slot])
      wbt = bt_ring.at[slot][...].astype(jnp.float32) * bcast(w_col, (np_, BLOCK), 1)
      wbt_smem[...] = wbt.astype(dtype)
      plgpu.commit_smem()
      plgpu.barrier_wait(xt_ready.at[slot])
      carried = ops.nt(c_ring.at[slot], s_smem)  # C Sᵀ [T, dp]
      y = ops.nt(w_smem, xt_ring.at[slot], acc=carried * bcast(e_row, (BLOCK, dp), 0))
      state = ops.nt(xt_ring.at[slot], wbt_smem, acc=state * gate)
      plgpu.barrier_arrive(consumed.at[slot])
      y_smem[...] = y
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(y_smem, y_ref.at[batch, pl.ds(i * BLOCK, BLOCK), head])
      return state

    final = lax.fori_loop(0, num_blocks, step, state0)
    write_state(final, sf_ref.at[batch, head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 1)
  def _memory():
    ops.set_registers(compute=False)
    produce_ring(ring.streams((xt_ref, b_ref, bt_ref, c_ref, rows_ref), batch, head, group),
                 num_blocks, slots)


def block_rows(cs, doc, keep, to_end):
  """float32 [b, h, ROWS, t]: cs, doc, e, w, gate per token (t a multiple of BLOCK).

  cs [b, t, h] and doc / keep / to_end [b, t] as api.chunk_rows returns them.
  """
  b, t, h = cs.shape
  nb = t // BLOCK
  cs = jnp.transpose(cs.reshape(b, nb, BLOCK, h), (0, 3, 1, 2))  # [b, h, nb, T]
  per_row = lambda z: jnp.broadcast_to(z.reshape(b, 1, nb, BLOCK), cs.shape)  # noqa: E731
  doc, keep, to_end = per_row(doc), per_row(keep), per_row(to_end)
  cs_last = cs[..., -1:]
  e = jnp.exp(cs) * keep
  w = jnp.exp(cs_last - cs) * to_end
  gate = jnp.broadcast_to(jnp.exp(cs_last) * keep[..., -1:], cs.shape)
  rows = jnp.stack([cs, doc, e, w, gate], axis=2)  # [b, h, ROWS, nb, T]
  return rows.reshape(b, h, ROWS, t)


def pad_last(z, size: int):
  """z zero-padded to `size` along its last axis (d or N to whole 64-element tiles)."""
  return jnp.pad(z, [(0, 0)] * (z.ndim - 1) + [(0, size - z.shape[-1])])


def forward(x_dt, cs, doc, keep, to_end, bmat, cmat, initial_state, *, interpret,
            save_states: bool = False, save_every: int = 1):
  """The blocked scan; arguments and results as gpu.forward's, blocks of BLOCK tokens.

  Args:
    x_dt: [b, t, h, d] x·dt in the compute dtype (t a multiple of BLOCK).
    cs: float32 [b, t, h]; doc, keep, to_end: float32 [b, t] (api.chunk_rows).
    bmat, cmat: [b, t, ng, N] in the compute dtype.
    initial_state: float32 [b, h, N, d] (transposed).
    interpret: False; True (or the interpreter's params) runs jax's Mosaic GPU
      interpreter on CPU.

  Returns:
    y float32 [b, t, h, d] without the D·x skip; final state float32
    [b, h, N, d]; with save_states, the state entering every save_every-th block
    float32 [b, h, ceil(nb / save_every), N, d].
  """
  b, t, h, d = x_dt.shape
  ng, n = bmat.shape[2], bmat.shape[3]
  dp, np_ = padded(d), padded(n)
  dtype = x_dt.dtype
  slots = slots_for(d, n, dtype)
  if not slots:
    raise ValueError(f"The Mosaic GPU SSD kernel needs {smem_bytes(d, n, dtype, 1)} bytes "
                     f"of shared memory for head_dim={d}, state_size={n}; set "
                     "config.gpu_kernel='triton'.")
  nb = t // BLOCK
  xt = jnp.transpose(pad_last(x_dt, dp), (0, 2, 3, 1))  # [b, h, dp, t]
  bmat, cmat = pad_last(bmat, np_), pad_last(cmat, np_)
  bt = jnp.transpose(bmat, (0, 2, 3, 1))  # [b, ng, Np, t]
  rows = block_rows(cs, doc, keep, to_end)
  state0 = jnp.swapaxes(initial_state, -1, -2)  # [b, h, d, N]
  state0 = jnp.pad(state0, [(0, 0), (0, 0), (0, dp - d), (0, np_ - n)])
  f32 = jnp.float32
  out_type = [jax.ShapeDtypeStruct((b, t, h, dp), f32),
              jax.ShapeDtypeStruct((b, h, dp, np_), f32)]
  saved = -(-nb // save_every)
  if save_states:
    out_type.append(jax.ShapeDtypeStruct((b, h, saved, dp, np_), f32))
  s_smem = tiled_smem((dp, np_), dtype)
  stage = [] if dtype == f32 else [tiled_smem((dp, np_), f32)]
  scratch = [tiled_smem((slots, dp, BLOCK), dtype), tiled_smem((slots, BLOCK, np_), dtype),
             tiled_smem((slots, np_, BLOCK), dtype), tiled_smem((slots, BLOCK, np_), dtype),
             plgpu.SMEM((slots, ROWS, BLOCK), f32),
             tiled_smem((BLOCK, BLOCK), dtype), s_smem, tiled_smem((np_, BLOCK), dtype),
             tiled_smem((BLOCK, dp), f32), *stage,
             *[plgpu.Barrier(num_barriers=slots) for _ in range(5)],
             plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=1)]
  ops = MosaicOps(interpret=bool(interpret))
  body = functools.partial(_kernel, num_blocks=nb, group=h // ng, slots=slots,
                           save_every=save_every, save=save_states,
                           stage_is_state=dtype == f32, ops=ops)
  out = plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=(h, b),
      grid_names=("heads", "batch"), num_threads=2, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=kernel_interpret(interpret))(xt, bmat, bt, cmat, rows, state0)
  unpad = lambda s: jnp.swapaxes(s[..., :d, :n], -1, -2)  # noqa: E731
  result = (out[0][..., :d], unpad(out[1]))
  return result + ((unpad(out[2]),) if save_states else ())

