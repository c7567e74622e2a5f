"""The WKV-7 kernels' entry point: checks, static config, layout and padding, the custom VJP.

    from pallas_kernels.wkv7 import Wkv7Config, wkv7_pallas
    y, state = wkv7_pallas(r, w, k, v, a, b, doc=doc, config=Wkv7Config("h100"))

Legend: layers/__init__.py (b batch, t sequence, h heads, d head size, B chunk
length, nb chunks). The kernel is picked from `config.chip` (static data; the
device is never queried while tracing): 'tpu_*' run tpu.py (Mosaic TPU);
'h100'/'h200' run gpu_mosaic.py (Mosaic GPU: wgmma, TMA) or, with
`gpu_kernel='triton'`, gpu.py (Pallas Triton). The wrapper transposes to head-major
[b, h, t, d], pads t to whole chunks (w = 1 and zero inputs on padded tokens,
which leave the state as it is) and turns the document index into the per-chunk
masks the kernels read (`doc_masks`).

Gradients: a custom VJP whose backward is Pallas kernels too. The forward kernel
saves the state before each chunk ([b, h, nb, d, d] float32, nb·d² per head:
the memory a chunk scan's backward needs); the backward kernel (tpu_bwd.py /
gpu_bwd.py) scans the chunks in reverse, carrying the state's cotangent, and runs
the VJP of the chunk's matrix form (chunk.chunk_step_vjp) inside the kernel.
On GPU with gpu_kernel='mosaic' the backward is gpu_mosaic_bwd.py: the chunk
VJP runs in XLA over all chunks at once, around a Mosaic GPU kernel that scans
the state's cotangent in reverse (its module doc says why that split).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import config as chip_config
from pallas_kernels.wkv7 import gpu, gpu_bwd, gpu_mosaic, gpu_mosaic_bwd, tpu, tpu_bwd

HEAD_SIZES = (32, 64)  # d served on both platforms (tiny models, published RWKV-7).
CHUNK_SIZES = (16, 32, 64)  # B: powers of two (Triton), multiples of 16 (bf16 TPU tiles).
DTYPES = (jnp.float32, jnp.bfloat16)
GPU_KERNELS = chip_config.GPU_KERNELS  # Wkv7Config.gpu_kernel


@dataclasses.dataclass(frozen=True)
class Wkv7Config:
  """Target chip and chunk length of one WKV-7 kernel call (hashable, static).

  Attributes:
    chip: a key of pallas_kernels.common.config.CHIPS ('h100', 'h200', 'tpu_v4',
      'tpu_v5e', 'tpu_v5p', 'tpu_v6e'): picks the GPU or TPU kernel.
    chunk_size: tokens per chunk B, one of CHUNK_SIZES. The in-chunk decays are
      factored around the chunk's middle (chunk.py): B · max(−log w) / 2 must
      stay well below 88 (float32's exp range); RWKV-7's w >= 0.545 gives 19 at B = 64.
    gpu_kernel: the GPU kernel on 'h100'/'h200': 'mosaic' (Mosaic GPU, gpu_mosaic.py:
      TF32 wgmmas, the state in float32) or 'triton' (Pallas Triton, gpu.py: float32
      IEEE dots). Ignored on TPU chips.
  """
  chip: str
  chunk_size: int = 16
  gpu_kernel: str = "mosaic"

  def __post_init__(self):
    if self.chip not in chip_config.CHIPS:
      raise ValueError(f"config.chip={self.chip!r}; choose one of {sorted(chip_config.CHIPS)}.")
    if self.chunk_size not in CHUNK_SIZES:
      raise ValueError(f"config.chunk_size={self.chunk_size}; the WKV-7 kernels take one of "
                       f"{CHUNK_SIZES}.")
    if self.gpu_kernel not in GPU_KERNELS:
      raise ValueError(f"config.gpu_kernel={self.gpu_kernel!r}; choose one of {GPU_KERNELS}.")

  @property
  def platform(self) -> str:
    """'gpu' or 'tpu'."""
    return chip_config.CHIPS[self.chip][0]

  @property
  def device_kind(self) -> str:
    """The chip's jax device_kind (for an AbstractDevice when exporting)."""
    return chip_config.CHIPS[self.chip][2]


def unsupported_reason(head_size: int, dtype, chunk_size: int,
                       gpu_kernel: str | None = None) -> str | None:
  """Why the kernels cannot serve these static properties, or None when they can.

  gpu_kernel: also check that GPU kernel ('mosaic' | 'triton'); None: the common set.
  """
  if head_size not in HEAD_SIZES:
    return f"head size d={head_size} (the kernels serve {HEAD_SIZES})"
  if jnp.dtype(dtype) not in [jnp.dtype(x) for x in DTYPES]:
    return f"dtype {jnp.dtype(dtype).name} (the kernels take float32 or bfloat16)"
  if chunk_size not in CHUNK_SIZES:
    return f"chunk length {chunk_size} (the kernels take {CHUNK_SIZES})"
  if gpu_kernel == "mosaic":
    return gpu_mosaic.unsupported_reason(head_size, chunk_size)
  return None


def _check(r, w, k, v, a, b, doc, initial_state, config):
  if not isinstance(config, Wkv7Config):
    raise ValueError(f"config={config!r} must be a Wkv7Config.")
  if r.ndim != 4:
    raise ValueError(f"r has shape {r.shape}; expected [b, t, h, d].")
  for name, x in zip("wkvab", (w, k, v, a, b)):
    if x.shape != r.shape:
      raise ValueError(f"{name} has shape {x.shape}; expected r's {r.shape}.")
    if x.dtype != r.dtype:
      raise ValueError(f"{name} is {x.dtype}, r is {r.dtype}: pass one dtype.")
  batch, t, h, d = r.shape
  reason = unsupported_reason(d, r.dtype, config.chunk_size,
                              config.gpu_kernel if config.platform == "gpu" else None)
  if reason:
    raise ValueError(f"The WKV-7 kernels cannot serve {reason}.")
  if doc is not None and (doc.shape != (batch, t) or not jnp.issubdtype(doc.dtype, jnp.integer)):
    raise ValueError(f"doc is {doc.dtype}{list(doc.shape)}; expected int [b, t] = {[batch, t]}.")
  if initial_state is not None and initial_state.shape != (batch, h, d, d):
    raise ValueError(f"initial_state has shape {initial_state.shape}; expected [b, h, d, d] "
                     f"= {(batch, h, d, d)}.")


def doc_masks(doc, chunk: int):
  """The kernels' document masks from doc int [b, t] (t % chunk == 0).

  Returns:
    same float32 [b, nb, B, B]: 1 where two tokens of a chunk share a document;
    from_state float32 [b, t, 1]: 1 where a token's document is that of the token
      before its chunk (document 0 before the first chunk: the initial state's);
    to_end float32 [b, t, 1]: 1 where a token shares its chunk's last token's document.
  """
  batch, t = doc.shape
  chunks = doc.reshape(batch, t // chunk, chunk)
  before = jnp.concatenate([jnp.zeros((batch, 1), doc.dtype), chunks[:, :-1, -1]], axis=1)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  same = f32(chunks[:, :, :, None] == chunks[:, :, None, :])
  from_state = f32(chunks == before[:, :, None]).reshape(batch, t, 1)
  to_end = f32(chunks == chunks[:, :, -1:]).reshape(batch, t, 1)
  return same, from_state, to_end


def _kernel_inputs(r, w, k, v, a, b, doc, chunk: int):
  """Head-major, padded kernel operands: (r, logw, k, v, a, b, same, from_state, to_end)."""
  pad = (-r.shape[1]) % chunk
  head_major = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))  # noqa: E731
  logw = head_major(jnp.log(w.astype(jnp.float32)))  # padding: log w = 0, w = 1
  doc = jnp.pad(doc.astype(jnp.int32), ((0, 0), (0, pad)), mode="edge")
  return (head_major(r), logw, head_major(k), head_major(v), head_major(a), head_major(b),
          *doc_masks(doc, chunk))


def _forward(r, w, k, v, a, b, doc, initial_state, config: Wkv7Config, interpret,
             save_states: bool):
  """(y [b, t, h, d], final state), and the backward's residuals when save_states."""
  operands = _kernel_inputs(r, w, k, v, a, b, doc, config.chunk_size)
  kernel = _forward_kernel(config)
  y, state, *starts = kernel(*operands, initial_state, chunk=config.chunk_size,
                             interpret=interpret, save_states=save_states)
  out = (jnp.swapaxes(y[:, :, :r.shape[1]], 1, 2), state)
  return (out, (operands, starts[0], w)) if save_states else out


def _forward_kernel(config: Wkv7Config):
  if config.platform == "tpu":
    return tpu.forward
  return gpu_mosaic.forward if config.gpu_kernel == "mosaic" else gpu.forward


def _backward_kernel(config: Wkv7Config):
  if config.platform == "tpu":
    return tpu_bwd.backward
  return gpu_mosaic_bwd.backward if config.gpu_kernel == "mosaic" else gpu_bwd.backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _core(r, w, k, v, a, b, doc, initial_state, config, interpret):
  return _forward(r, w, k, v, a, b, doc, initial_state, config, interpret, False)


def _core_fwd(r, w, k, v, a, b, doc, initial_state, config, interpret):
  return _forward(r, w, k, v, a, b, doc, initial_state, config, interpret, True)


def _core_bwd(config, interpret, residuals, cotangents):
  operands, starts, w = residuals
  dy, d_final = cotangents
  t = w.shape[1]
  pad = operands[0].shape[2] - t
  dy = jnp.pad(jnp.swapaxes(dy, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))
  kernel = _backward_kernel(config)
  *grads, d_initial = kernel(*operands, starts, dy, d_final.astype(jnp.float32),
                             chunk=config.chunk_size, interpret=interpret)
  dr, dlogw, dk, dv, da, db = (jnp.swapaxes(g[:, :, :t], 1, 2) for g in grads)
  dw = dlogw / w.astype(jnp.float32)  # logw = log w
  grads = tuple(g.astype(w.dtype) for g in (dr, dw, dk, dv, da, db))
  return (*grads, None, d_initial)  # no cotangent for the integer doc


_core.defvjp(_core_fwd, _core_bwd)


def wkv7_pallas(r, w, k, v, a, b, *, doc=None, initial_state=None, config: Wkv7Config,
                interpret=False):
  """The WKV-7 recurrence (reference.wkv7's maths) by the Pallas kernel of config.chip.

  Args:
    r, w, k, v, a, b: [b, t, h, d], one dtype (float32 or bfloat16), d in HEAD_SIZES,
      any t; w the per-channel decay in (0, 1), bounded away from 0 (see Wkv7Config).
    doc: int [b, t] document index (layers.ssm.document_index): the state restarts
      from zero where it changes; token 0 continues `initial_state` only where
      doc[:, 0] == 0. None: one document per row.
    initial_state: float32 [b, h, d, d] (prefill from a saved state); None: zeros.
    config: Wkv7Config (chip and chunk length).
    interpret: False; True (or the platform's interpret params) runs the kernel
      body on CPU (gpu_kernel='mosaic': jax's Mosaic GPU interpreter).
  Returns:
    (y [b, t, h, d] in r.dtype, the float32 state after the last token [b, h, d, d]).
    Differentiable in r, w, k, v, a, b and initial_state (backward: see the module doc).
  Raises:
    ValueError: naming the argument, for shapes, dtypes, head sizes or configs
      the kernels cannot serve.
  """
  _check(r, w, k, v, a, b, doc, initial_state, config)
  batch, t, h, d = r.shape
  if initial_state is None:
    initial_state = jnp.zeros((batch, h, d, d), jnp.float32)
  if t == 0:
    return jnp.zeros(r.shape, r.dtype), initial_state.astype(jnp.float32)
  if doc is None:
    doc = jnp.zeros((batch, t), jnp.int32)
  return _core(r, w, k, v, a, b, doc, initial_state.astype(jnp.float32), config, interpret)
