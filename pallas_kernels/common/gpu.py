"""Hopper building blocks shared by the Mosaic GPU kernels.

`Ops` wraps the few instructions whose form differs between hardware and the
GPU interpreter of jax 0.10 (which runs plgpu kernels on CPU, simulating
warpgroups, SMEM, TMA and mbarriers, but cannot run a wgmma on a transposed
SMEM operand, nor one accumulating through pl.run_state (register operands),
nor layout casts). On hardware (`interpret=False`) each
method emits the wgmma / layout-annotated op; interpreted, it emits the same
math with plain jnp on SMEM loads. Everything else in the kernels (TMA
pipelining, barriers, masks, online softmax, stores) is the same code on both.

`produce_ring` is the memory warpgroup's loop: it streams per-step blocks from
GMEM into a ring of SMEM slots, waiting for the consumers to release a slot.
"""

import dataclasses
import math

from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b

# wgmma operand tiles: 8 rows x 128 bytes, 128-byte swizzle.
TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
COMPUTE_REGISTERS = 232
MEMORY_REGISTERS = 40
LOG2E = math.log2(math.e)


def interpret_params():
  """Default params of the jax 0.10 Mosaic GPU interpreter (a private module)."""
  from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
  return params.InterpretGPUParams()


def kernel_interpret(interpret):
  """plgpu.kernel's `interpret`: None on hardware (false), the interpreter's default params
  for True, or the Mosaic GPU interpreter params given."""
  if interpret is True:
    return interpret_params()
  return interpret or None


@dataclasses.dataclass(frozen=True)
class Ops:
  """Hardware (wgmma, layouts) or interpreter forms of the kernels' primitives."""
  interpret: bool

  def matmul_nt(self, a_smem, b_smem, shape):
    """f32 [rows, cols] = a @ b.T with a [rows, depth], b [cols, depth] in SMEM."""
    if self.interpret:
      return lax.dot_general(a_smem[...], b_smem[...], _NT,
                             preferred_element_type=jnp.float32)

    def body(acc_ref):
      plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
      return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))

  def matmul_acc(self, acc, a, b_smem):
    """acc + a @ b: acc f32 [rows, cols], a [rows, depth] in registers, b [depth, cols] in SMEM."""
    if self.interpret:
      return acc + lax.dot_general(a, b_smem[...], _NN,
                                   preferred_element_type=jnp.float32)

    def body(acc_ref):
      plgpu.wgmma(acc_ref, a, b_smem)
    return pl.run_state(body)(plgpu.ACC.init(acc))

  def iota(self, shape, dimension):
    """int32 iota in the wgmma accumulator layout."""
    if self.interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dimension)
    return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)

  def full(self, shape, value, dtype=jnp.float32):
    """A [rows, cols] tile (wgmma layout) or a per-row [rows] vector (its row reduction)."""
    x = jnp.full(shape, value, dtype)
    if self.interpret:
      return x
    layout = plgpu.Layout.WGMMA if len(shape) == 2 else plgpu.Layout.WGMMA.reduce(1)
    return plgpu.layout_cast(x, layout)

  def load_vector(self, smem_ref, axis: int):
    """A 1-D SMEM vector laid out to broadcast along `axis` of a wgmma tile.

    axis=1: one value per row (the row statistics' layout); axis=0: per column.
    """
    if self.interpret:
      return smem_ref[...]
    return plgpu.load(smem_ref, (), layout=plgpu.Layout.WGMMA.reduce(axis))

  def set_registers(self, compute: bool):
    if not self.interpret:
      plgpu.set_max_registers(COMPUTE_REGISTERS if compute else MEMORY_REGISTERS,
                              action="increase" if compute else "decrease")


def warp_specialized_kernel(body, *, out_type, scratch, grid, grid_names, compute_wgs: int,
                            interpret):
  """plgpu.kernel with `compute_wgs` compute warpgroups plus one memory warpgroup ("wg")."""
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
      num_threads=compute_wgs + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret or None)


def smem(shape, dtype, tiled: bool = False):
  """An SMEM scratch type; tiled ones carry the wgmma operand transforms."""
  return plgpu.SMEM(shape, dtype, transforms=TRANSFORMS if tiled else ())


def bcast(vector, shape, axis: int):
  """[rows] -> [rows, cols] (axis=0: vector indexes rows) or [cols] -> [rows, cols] (axis=1)."""
  return lax.broadcast_in_dim(vector, shape, [axis])


def segment_mask(q_ids, kv_ids, shape, transposed: bool):
  """bool tile: query and key share a segment (ids are per-row / per-column vectors)."""
  q_axis, kv_axis = (1, 0) if transposed else (0, 1)
  return bcast(q_ids, shape, q_axis) == bcast(kv_ids, shape, kv_axis)


@dataclasses.dataclass(frozen=True)
class Stream:
  """One operand the memory warpgroup streams: src(step) is a GMEM ref view.

  Attributes:
    src: step index (traced int32) -> GMEM ref slice to copy.
    ring: SMEM ref [slots, ...].
    ready: barrier array [slots] the copy completes on.
    consumed: barrier array [slots] (one arrival per compute warpgroup) the
      consumers arrive on when done with the slot, or None to share the slot
      release of the previous stream.
    when: None, or step -> traced bool: copy only on steps where it holds (the
      consumer must wait on `ready` under the same condition). Only for
      streams with consumed=None.
  """
  src: object
  ring: object
  ready: object
  consumed: object = None
  when: object = None


def produce_ring(streams, num_steps, num_slots: int):
  """Memory warpgroup: copy step t of every stream into slot t % num_slots.

  Before reusing a slot it waits for that stream's `consumed` barrier (streams
  with consumed=None are refilled after the preceding stream's wait); at the
  end it waits for the consumers to release the last slots.
  """
  def load(step, slot, wait: bool):
    for stream in streams:
      if wait and stream.consumed is not None:
        plgpu.barrier_wait(stream.consumed.at[slot])
      copy = lambda stream=stream: plgpu.copy_gmem_to_smem(
          stream.src(step), stream.ring.at[slot], stream.ready.at[slot])
      if stream.when is None:
        copy()
      else:
        pl.when(stream.when(step))(copy)

  for t in range(num_slots):
    @pl.when(t < num_steps)
    def _prologue():
      load(jnp.int32(t), t, wait=False)

  @pl.loop(jnp.int32(num_slots), jnp.maximum(num_steps, num_slots))
  def _steady(step):
    load(step, lax.rem(step, jnp.int32(num_slots)), wait=True)

  # Observe the last release of every slot, so that each barrier phase is
  # waited on (the interpreter checks this; on hardware it only delays exit).
  @pl.loop(jnp.maximum(num_steps - num_slots, 0), num_steps)
  def _drain(step):
    for stream in streams:
      if stream.consumed is not None:
        plgpu.barrier_wait(stream.consumed.at[lax.rem(step, jnp.int32(num_slots))])


def slot_of(step, num_slots: int):
  return lax.rem(step, jnp.int32(num_slots))
