"""The SSD (Mamba-2) scan in Pallas: checks, static config, chunk layout, custom VJP.

    from pallas_kernels.ssd import SsdConfig, ssd
    y, final_state = ssd(x, dt, a, bmat, cmat, d_skip, chunk_size=256,
                         config=SsdConfig("tpu_v5e"))

Same signature and result as the chunked jnp form (reference.ssd), plus
`config` and `interpret`. Legend: layers/__init__.py.

The kernel is picked from `config.chip` (static data; the runtime is never
asked while tracing): 'tpu_*' run the Mosaic TPU kernel (tpu.py: one grid step
per (batch, head, chunk), state in VMEM across the "arbitrary" chunk axis),
'h100'/'h200' a GPU kernel chosen by `config.gpu_kernel`: 'mosaic' (default;
gpu_mosaic.py: Mosaic GPU, one CTA per (batch, head), blocks of 64 tokens
streamed by TMA, wgmma products) or 'triton' (gpu.py: one program per
(batch, head), blocks in a loop). This wrapper pads t to whole blocks
(padding: dt = 0, no input, no decay, the last document continues), computes
what is cheap per token in XLA (x·dt, the in-block cumulative log decay, the
document flags) and adds the D·x skip after the kernel.

Backward: Pallas kernels too (tpu_bwd.py, gpu_bwd.py, gpu_mosaic_bwd.py; the
per-chunk maths in bwd_step.py). The custom VJP's forward also saves the
float32 state entering each chunk ([b, h, nb, N, d]; for the Triton backward,
at each chunk start or every 4 blocks, and the backward recomputes the blocks
between; for the Mosaic GPU backward, every block of 64); the backward kernel walks the
chunks in reverse with the state gradient in VMEM / registers and returns the gradients of x·dt,
B and C per head, the in-chunk cumulative log decay and the initial state;
this wrapper finishes the chain rule in XLA (x and dt from x·dt, dt and a from
the reverse cumulative sum, B and C summed over the heads of each group).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common.config import CHIPS, GPU_KERNELS, chip_of_device
from pallas_kernels.ssd import gpu as gpu_fwd
from pallas_kernels.ssd import gpu_bwd
from pallas_kernels.ssd import gpu_mosaic
from pallas_kernels.ssd import gpu_mosaic_bwd
from pallas_kernels.ssd import tpu as tpu_fwd
from pallas_kernels.ssd import tpu_bwd
from pallas_kernels.ssd.reference import document_index

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_GPU_SIZES = (16, 32, 64, 128, 256)  # Triton tiles: powers of two, >= 16 for a dot.


@dataclasses.dataclass(frozen=True)
class SsdConfig:
  """Chip and block sizes of one SSD kernel call (hashable, static).

  Attributes:
    chip: a key of common.config.CHIPS; picks the TPU or the GPU kernel.
    gpu_kernel: GPU only: 'mosaic' (Mosaic GPU: gpu_mosaic.py, and for 16-bit
      inputs gpu_mosaic_bwd.py; float32 inputs take the Triton backward after
      the Mosaic forward) or 'triton' (gpu.py, gpu_bwd.py).
    gpu_block: Triton only: tokens per loop step (a power of two >= 16); the
      Mosaic kernel's block is gpu_mosaic.BLOCK (64), and the TPU kernel's the
      call's chunk_size.
    gpu_num_warps: GPU only: warps per (batch, head) program of the forward.
    gpu_num_warps_bwd: GPU only: the same for the backward, which holds about
      twice as many [B, B] float32 tiles at once.
  """
  chip: str
  gpu_kernel: str = "mosaic"
  gpu_block: int = 64
  gpu_num_warps: int = 4
  gpu_num_warps_bwd: int = 8

  def __post_init__(self):
    if self.chip not in CHIPS:
      raise ValueError(f"config.chip={self.chip!r}; choose one of {sorted(CHIPS)}.")
    if self.gpu_kernel not in GPU_KERNELS:
      raise ValueError(f"config.gpu_kernel={self.gpu_kernel!r}; choose one of {GPU_KERNELS}.")
    if self.gpu_block not in _GPU_SIZES:
      raise ValueError(f"config.gpu_block={self.gpu_block}; choose one of {_GPU_SIZES}.")
    for name in ("gpu_num_warps", "gpu_num_warps_bwd"):
      if getattr(self, name) not in (1, 2, 4, 8, 16):
        raise ValueError(f"config.{name}={getattr(self, name)}; choose 1, 2, 4, 8 or 16.")

  @property
  def platform(self) -> str:
    """'gpu' or 'tpu'."""
    return CHIPS[self.chip][0]


def default_config(chip: str | None = None) -> SsdConfig:
  """The config of `chip`, or of `jax.devices()[0]` when None (TPU v5e on CPU).

  Call outside jit: it may query the runtime.
  """
  return SsdConfig(chip or chip_of_device(jax.devices()[0]) or "tpu_v5e")


def unsupported(platform: str, *, head_dim: int, state_size: int, chunk_size: int,
                dtype, gpu_kernel: str = "mosaic") -> str | None:
  """Why the `platform` ('tpu' | 'gpu') kernel cannot serve these shapes, or None.

  On GPU, `gpu_kernel` ('mosaic' | 'triton', SsdConfig.gpu_kernel) names the
  kernel; the Mosaic one serves the Triton sizes whose forward fits its shared
  memory (its backward is the Mosaic one for 16-bit inputs where that fits,
  else the Triton one).
  """
  dtypes = _DTYPES if platform == "gpu" else _DTYPES[:2]  # No float16 on the TPU MXU.
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in dtypes]:
    names = ", ".join(jnp.dtype(d).name for d in dtypes)
    return f"dtype {jnp.dtype(dtype).name} is not one of {names}"
  if platform == "tpu" and chunk_size % 8:
    return f"chunk_size={chunk_size} is not a multiple of 8 (TPU sublanes)"
  if platform == "gpu":
    for name, size in (("head_dim", head_dim), ("state_size", state_size)):
      if size not in _GPU_SIZES:
        return f"{name}={size} is not one of {_GPU_SIZES} (Triton tile sizes)"
    if gpu_kernel == "mosaic" and not gpu_mosaic.slots_for(head_dim, state_size, dtype):
      need = gpu_mosaic.smem_bytes(head_dim, state_size, dtype, 1) // 1024
      return (f"head_dim={head_dim}, state_size={state_size} in {jnp.dtype(dtype).name} need "
              f"{need} KiB of shared memory in the Mosaic GPU kernel (227 available; "
              "gpu_kernel='triton' serves them)")
  return None


@dataclasses.dataclass(frozen=True)
class _Plan:
  platform: str
  gpu_kernel: str
  block: int
  num_warps: int
  num_warps_bwd: int
  save_every: int  # GPU: the forward saves the state entering every save_every-th block.
  interpret: object
  mosaic_backward: bool = False  # GPU: the Mosaic GPU backward (16-bit inputs), not Triton's.


def _check(x, dt, a, bmat, cmat, d_skip, initial_state):
  if x.ndim != 4:
    raise ValueError(f"x must be [b, t, h, d]; got shape {x.shape}.")
  b, t, h, d = x.shape
  if bmat.ndim != 4 or bmat.shape[:2] != (b, t) or cmat.shape != bmat.shape:
    raise ValueError(f"bmat and cmat must be [b, t, ng, N] = [{b}, {t}, ng, N]; got "
                     f"{bmat.shape} and {cmat.shape}.")
  if h % bmat.shape[2]:
    raise ValueError(f"heads h={h} must be a multiple of the B/C groups ng={bmat.shape[2]}.")
  if dt.shape != (b, t, h) or a.shape != (h,) or d_skip.shape != (h,):
    raise ValueError(f"dt must be [b, t, h] = {(b, t, h)}, a and d_skip [h] = ({h},); got "
                     f"{dt.shape}, {a.shape}, {d_skip.shape}.")
  n = bmat.shape[3]
  if initial_state is not None and initial_state.shape != (b, h, d, n):
    raise ValueError(f"initial_state must be [b, h, d, N] = {(b, h, d, n)}; got "
                     f"{initial_state.shape}.")
  if t == 0:
    raise ValueError("t = 0: the sequence is empty.")


def ssd(x, dt, a, bmat, cmat, d_skip, *, chunk_size: int, segment_ids=None,
        initial_state=None, initial_segment_ids=None, interpret=False,
        config: SsdConfig | None = None):
  """The SSD scan of a whole sequence by a Pallas kernel; see reference.ssd for the maths.

  Args:
    x: [b, t, h, d] float32 or bfloat16, or float16 on GPU (the output has its dtype).
    dt: [b, t, h] positive step sizes. a: [h] negative decay rates.
    bmat, cmat: [b, t, ng, N] (cast to x.dtype). d_skip: [h].
    chunk_size: B; the TPU kernel's chunk (a multiple of 8). The GPU kernel
      loops over config.gpu_block tokens instead (same result).
    segment_ids: int [b, t] or None; the state resets where the id changes.
    initial_state: float32 [b, h, d, N] or None (zeros).
    initial_segment_ids: int [b] or None (see reference.document_index).
    interpret: True runs the kernel body on CPU (Pallas interpret mode).
    config: SsdConfig; None: `default_config()` (build it outside jit).

  Returns:
    (y [b, t, h, d] in x.dtype, final state float32 [b, h, d, N]).

  Raises:
    ValueError: for shapes, dtypes or chunk sizes the kernels cannot serve.
  """
  _check(x, dt, a, bmat, cmat, d_skip, initial_state)
  config = config or default_config()
  b, t, h, d = x.shape
  n = bmat.shape[3]
  reason = unsupported(config.platform, head_dim=d, state_size=n, chunk_size=chunk_size,
                       dtype=x.dtype, gpu_kernel=config.gpu_kernel)
  if reason:
    raise ValueError(f"The {config.chip} SSD kernel cannot serve this call: {reason}.")
  if config.platform == "tpu":
    block = min(chunk_size, -(-t // 8) * 8)
  elif config.gpu_kernel == "mosaic":
    block = gpu_mosaic.BLOCK
  else:
    block = min(config.gpu_block, max(16, 1 << (t - 1).bit_length()))
  # Triton: save a state per chunk (at most every 4 blocks: the backward recomputes the
  # rest); the Mosaic GPU backward (16-bit inputs) reads the state entering every block.
  save_every = min(4, chunk_size // block) if chunk_size % block == 0 else 1
  mosaic_backward = (config.platform == "gpu" and config.gpu_kernel == "mosaic"
                     and gpu_mosaic_bwd.slots_for(d, n, x.dtype) > 0)
  plan = _Plan(config.platform, config.gpu_kernel, block, config.gpu_num_warps,
               config.gpu_num_warps_bwd, 1 if mosaic_backward else max(1, save_every),
               interpret, mosaic_backward)
  state0 = (jnp.zeros((b, h, d, n), jnp.float32) if initial_state is None
            else initial_state.astype(jnp.float32))
  cast = lambda z: z.astype(x.dtype)  # noqa: E731
  y, final = _core(x, dt.astype(jnp.float32), a.astype(jnp.float32), cast(bmat), cast(cmat),
                   state0, segment_ids, initial_segment_ids, plan)
  y = y + x.astype(jnp.float32) * d_skip.astype(jnp.float32)[:, None]
  return y.astype(x.dtype), final


def chunk_rows(dt, a, segment_ids, initial_segment_ids, shape, block: int):
  """Per-token float32 scalars of blocks of `block` tokens; shape is (b, padded t, h).

  dt [b, t, h] and segment ids are unpadded; padding continues the last document.

  Returns:
    cs [b, t, h]: cumulative log decay dt·a within each block (inclusive);
    doc [b, t]: document index; keep [b, t]: 1 where the token is in the
    document of the state entering its block; to_end [b, t]: 1 where the token
    is in its block's last document (its input reaches the block's end state).
  """
  b, padded, h = shape
  nb = padded // block
  t = dt.shape[1]
  doc = document_index(segment_ids, (b, t), initial_segment_ids)
  pad = padded - t
  if pad:
    dt = jnp.pad(dt, [(0, 0), (0, pad), (0, 0)])
    doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")
  cs = jnp.cumsum((dt * a).reshape(b, nb, block, h), axis=2).reshape(b, padded, h)
  docs = doc.reshape(b, nb, block)
  doc_before = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), docs[:, :-1, -1]], axis=1)
  keep = docs == doc_before[..., None]
  to_end = docs == docs[..., -1:]
  flat = lambda z: z.reshape(b, padded).astype(jnp.float32)  # noqa: E731
  return cs, flat(docs), flat(keep), flat(to_end)


def _layout(x, dt, a, bmat, cmat, segment_ids, initial_segment_ids, plan: _Plan):
  """The kernels' operands, t padded to whole blocks (XLA side).

  Returns: dict of cs, doc, keep, to_end (token-major, chunk_rows), x_dt, bmat,
  cmat (token-major, padded) and, for the TPU kernels, their head-major forms
  x_dt_h, bmat_h, cmat_h, cs_rows, rows and the chunk-transposed bmat_t, cmat_t.
  """
  b, t, h, d = x.shape
  block = plan.block
  padded = -(-t // block) * block
  pad = padded - t
  cs, doc, keep, to_end = chunk_rows(dt, a, segment_ids, initial_segment_ids, (b, padded, h),
                                     block)
  x_dt = (x.astype(jnp.float32) * dt[..., None]).astype(x.dtype)
  if pad:
    x_dt, bmat, cmat = (_pad_tokens(z, pad) for z in (x_dt, bmat, cmat))
  ops = dict(cs=cs, doc=doc, keep=keep, to_end=to_end, x_dt=x_dt, bmat=bmat, cmat=cmat)
  if plan.platform == "tpu":
    nb = padded // block
    chunk_t = lambda z: jnp.transpose(  # noqa: E731
        z.reshape(b, nb, block, z.shape[2], z.shape[3]), (0, 3, 1, 4, 2))
    ops.update(
        x_dt_h=_heads_first(x_dt), bmat_h=_heads_first(bmat), cmat_h=_heads_first(cmat),
        bmat_t=chunk_t(bmat), cmat_t=chunk_t(cmat),
        cs_rows=jnp.transpose(cs.reshape(b, nb, block, h), (0, 3, 1, 2))[:, :, :, None, :],
        rows=jnp.swapaxes(jnp.stack([doc, keep, to_end], axis=1).reshape(b, 3, nb, block),
                          1, 2))
  return ops


def _pad_tokens(z, pad):
  return jnp.pad(z, [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2))


def _heads_first(z):
  return jnp.swapaxes(z, 1, 2)


def _forward(x, dt, a, bmat, cmat, state0, segment_ids, initial_segment_ids, plan: _Plan,
             save_states: bool):
  """(y float32 [b, t, h, d] without D·x, final state float32 [b, h, d, N], entering
  states float32 [b, h, nb, N, d] or None)."""
  t = x.shape[1]
  ops = _layout(x, dt, a, bmat, cmat, segment_ids, initial_segment_ids, plan)
  state0 = jnp.swapaxes(state0, -1, -2)  # [b, h, N, d]
  if plan.platform == "tpu":
    out = tpu_fwd.forward(ops["x_dt_h"], ops["cs_rows"], ops["rows"], ops["bmat_h"],
                          ops["bmat_t"], ops["cmat_h"], state0, chunk=plan.block,
                          interpret=plan.interpret, save_states=save_states)
    y = _heads_first(out[0])
  elif plan.gpu_kernel == "mosaic":
    out = gpu_mosaic.forward(ops["x_dt"], ops["cs"], ops["doc"], ops["keep"], ops["to_end"],
                             ops["bmat"], ops["cmat"], state0, interpret=plan.interpret,
                             save_states=save_states, save_every=plan.save_every)
    y = out[0]
  else:
    out = gpu_fwd.forward(ops["x_dt"], ops["cs"], ops["doc"], ops["keep"], ops["to_end"],
                          ops["bmat"], ops["cmat"], state0, block=plan.block,
                          num_warps=plan.num_warps, interpret=plan.interpret,
                          save_states=save_states, save_every=plan.save_every)
    y = out[0]
  states = out[2] if save_states else None
  return y[:, :t], jnp.swapaxes(out[1], -1, -2), states


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _core(x, dt, a, bmat, cmat, state0, segment_ids, initial_segment_ids, plan):
  y, final, _ = _forward(x, dt, a, bmat, cmat, state0, segment_ids, initial_segment_ids, plan,
                         save_states=False)
  return y, final


def _core_fwd(x, dt, a, bmat, cmat, state0, segment_ids, initial_segment_ids, plan):
  y, final, states = _forward(x, dt, a, bmat, cmat, state0, segment_ids, initial_segment_ids,
                              plan, save_states=True)
  return (y, final), (x, dt, a, bmat, cmat, segment_ids, initial_segment_ids, states)


def _core_bwd(plan, residuals, cotangents):
  """The Pallas reverse scan, then the chain rule through x·dt, cs = cumsum(dt·a), groups."""
  x, dt, a, bmat, cmat, segment_ids, initial_segment_ids, states = residuals
  dy, dfinal = cotangents
  b, t, h, d = x.shape
  ng, n = bmat.shape[2], bmat.shape[3]
  ops = _layout(x, dt, a, bmat, cmat, segment_ids, initial_segment_ids, plan)
  padded = ops["x_dt"].shape[1]
  dy = _pad_tokens(dy.astype(jnp.float32), padded - t)
  dfinal = jnp.swapaxes(dfinal.astype(jnp.float32), -1, -2)
  if plan.platform == "tpu":
    grads = tpu_bwd.backward(ops["x_dt_h"], ops["cs_rows"], ops["rows"], ops["bmat_h"],
                             ops["bmat_t"], ops["cmat_h"], ops["cmat_t"], states,
                             _heads_first(dy), dfinal, chunk=plan.block,
                             interpret=plan.interpret)
    dx_dt, db, dc, dcs, dinitial = grads
    dx_dt, db, dc = _heads_first(dx_dt), _heads_first(db), _heads_first(dc)
    dcs = jnp.transpose(dcs[:, :, :, 0, :], (0, 2, 3, 1)).reshape(b, padded, h)
  elif plan.mosaic_backward:
    dx_dt, db, dc, dcs, dinitial = gpu_mosaic_bwd.backward(
        ops["x_dt"], ops["cs"], ops["doc"], ops["keep"], ops["to_end"], ops["bmat"],
        ops["cmat"], states, dy, dfinal, interpret=plan.interpret)
  else:
    dx_dt, db, dc, dcs, dinitial = gpu_bwd.backward(
        ops["x_dt"], ops["cs"], ops["doc"], ops["keep"], ops["to_end"], ops["bmat"],
        ops["cmat"], states, dy, dfinal, block=plan.block, num_warps=plan.num_warps_bwd,
        interpret=plan.interpret, save_every=plan.save_every)
  block = plan.block
  # cs is an inclusive cumsum of dt·a per block: its transpose is a reverse cumsum.
  dcs = dcs.reshape(b, padded // block, block, h)
  dlog_decay = jnp.flip(jnp.cumsum(jnp.flip(dcs, 2), axis=2), 2).reshape(b, padded, h)[:, :t]
  dx_dt = dx_dt[:, :t]
  dx = (dx_dt * dt[..., None]).astype(x.dtype)
  ddt = dlog_decay * a + jnp.sum(dx_dt * x.astype(jnp.float32), axis=-1)
  da = jnp.sum(dlog_decay * dt, axis=(0, 1))
  def by_group(grad):  # Per head -> per B/C group.
    return grad[:, :t].reshape(b, t, ng, h // ng, n).sum(3).astype(bmat.dtype)
  return (dx, ddt, da, by_group(db), by_group(dc), jnp.swapaxes(dinitial, -1, -2), None, None)


_core.defvjp(_core_fwd, _core_bwd)
