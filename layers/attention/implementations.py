"""Pure attention functions and the implementation switch (no Flax here).

All implementations compute causal grouped-query attention with optional
segment ids: query i attends to key j iff j <= i (by slot index) and both carry
the same nonzero segment id (0 marks padding, which attends to nothing and is
attended by nothing; its output is finite but meaningless). A nonzero
`sliding_window` W also requires i - j < W (Mistral, Gemma local layers: each
query sees itself and the W - 1 keys before it). With causal=False (spatial
attention of the UNet) every query attends every key of its segment.

Shapes: b batch, t query length, s key length, h query heads, k kv heads,
d head dim; h is a multiple of k (GQA). q [b, t, h, d], k/v [b, s, k, d].
"""

import math

import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from layers.attention import cpu_blocked
from pallas_kernels.common.config import MAX_HEAD_DIM as _PALLAS_MAX_HEAD_DIM

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CPU_QUERY_BLOCKS = 4  # 'xla' self-attention on CPU: query blocks of cpu_blocked.


def default_backend() -> str:
  """The platform jitted code runs on: 'cpu', 'tpu', 'cuda', 'rocm' (or 'gpu')."""
  backend = jax.default_backend()
  if backend == "gpu":
    version = jex.backend.get_backend().platform_version.lower()
    if "cuda" in version:
      return "cuda"
    if "rocm" in version:
      return "rocm"
  return backend


def resolve_impl(impl: str, *, backend: str, dtype, head_dim: int) -> str:
  """Turns 'auto' into a concrete implementation for `backend`; others pass through.

  'auto' picks the fastest implementation that runs:
  - CUDA: cuDNN flash attention when it takes the dtype (bf16 or fp16) and head
    dim (a multiple of 8, at most 128); else Treadle's Pallas kernel for bf16
    or fp16 (head_dim up to 256); else the XLA reference.
  - TPU: the Pallas kernel (float32 or bfloat16, head_dim up to 256), the only
    flash implementation there; the XLA reference materializes [b, h, t, s].
  - anywhere else (CPU): the XLA reference (Pallas would run interpreted).

  Raises:
    ValueError: for an implementation name not in IMPLEMENTATIONS.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl={impl!r}; choose one of {IMPLEMENTATIONS}.")
  if impl != "auto":
    return impl
  dtype = jnp.dtype(dtype)
  half = dtype in [jnp.dtype(d) for d in _CUDNN_DTYPES]
  pallas_head_dim = head_dim <= _PALLAS_MAX_HEAD_DIM
  if backend == "cuda":
    if half and head_dim % 8 == 0 and head_dim <= 128:
      return "cudnn"
    return "pallas" if half and pallas_head_dim else "xla"
  if backend == "tpu":
    tpu_dtype = dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    return "pallas" if tpu_dtype and pallas_head_dim else "xla"
  return "xla"


def attention_mask(t: int, s: int, *, q_segment_ids: jax.Array | None = None,
                   kv_segment_ids: jax.Array | None = None,
                   q_offset: jax.Array | int = 0, sliding_window: int = 0,
                   kv_slots: jax.Array | None = None, causal: bool = True) -> jax.Array:
  """Boolean mask [b or 1, t, s]: True where query i may attend key slot j.

  Query i sits at slot `q_offset + i` (q_offset > 0 when decoding into a cache).
  Segment ids are int [b, t] and [b, s]; None means one unpadded segment.
  `sliding_window` > 0 limits each query to keys fewer than that many slots
  back. `kv_slots` int [s] gives each key's slot when it is not its index (a
  rolling KV cache); a key at a negative slot is masked. causal=False drops
  the j <= slot condition.
  """
  q_slot = q_offset + jnp.arange(t, dtype=jnp.int32)
  k_slot = jnp.arange(s, dtype=jnp.int32) if kv_slots is None else kv_slots
  mask = (k_slot[None, :] >= 0)[None] & jnp.ones((1, t, 1), jnp.bool_)
  if causal:
    mask = mask & (k_slot[None, :] <= q_slot[:, None])[None]
  if sliding_window:
    mask = mask & (q_slot[:, None] - k_slot[None, :] < sliding_window)[None]
  if q_segment_ids is not None:
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = mask & same & (kv_segment_ids[:, None, :] != 0)
  return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Reference attention: explicit boolean `mask` [b or 1, t, s], float32 softmax.

  Returns [b, t, h, d] in q.dtype.
  """
  b, t, h, d = q.shape
  num_kv = k.shape[2]
  qg = q.reshape(b, t, num_kv, h // num_kv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  logits = logits * (d ** -0.5)
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d).astype(q.dtype)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    q_segment_ids: jax.Array | None = None,
                    kv_segment_ids: jax.Array | None = None,
                    sliding_window: int = 0, causal: bool = True) -> jax.Array:
  """cuDNN flash attention via `jax.nn.dot_product_attention`; [b, t, h, d].

  Without segment ids this is the fast `is_causal` path. With them, the segment
  mask is passed explicitly: correct for packed rows, but cuDNN runs much
  slower with an explicit mask ('pallas' handles segments natively).
  """
  mask = None
  if q_segment_ids is not None:
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = (same & (kv_segment_ids[:, None, :] != 0))[:, None]  # [b, 1, t, s]
  window = (sliding_window - 1, 0) if sliding_window else None
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                      local_window_size=window, implementation="cudnn")


def dividing_spec(logical_axes, shape, mesh) -> PartitionSpec:
  """The mesh spec of `logical_axes`, replicating dims the mesh axes don't divide.

  Small batches (a few sampling prompts) stay whole rather than fail to split.
  """
  spec = nn.logical_to_mesh_axes(logical_axes)
  entries = []
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else (axes or ())
    ways = math.prod(mesh.shape[name] for name in names)
    entries.append(axes if size % ways == 0 else None)
  return PartitionSpec(*entries)


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     q_segment_ids: jax.Array | None = None,
                     kv_segment_ids: jax.Array | None = None,
                     interpret: bool = False, chip: str = "",
                     sliding_window: int = 0, causal: bool = True) -> jax.Array:
  """The Pallas flash-attention kernel (imported lazily); [b, t, h, d].

  `chip` is the kernel target ('h100', 'tpu_v5e', ...; '' lets interpret
  mode use its default). Under a mesh the kernel runs per shard (shard_map)
  over the mesh axes that 'batch', 'heads' and 'kv_heads' map to, so the
  partitioner never gathers its inputs.
  """
  from pallas_kernels import flash_attention as fa  # pylint: disable=g-import-not-at-top
  from pallas_kernels.common import config as fa_config  # pylint: disable=g-import-not-at-top
  config = fa_config.FlashAttentionConfig(chip=chip) if chip else None
  window = (sliding_window - 1, 0) if sliding_window else None

  def attend(q, k, v, *segment_ids):
    q_seg, kv_seg = segment_ids if segment_ids else (None, None)
    return fa.flash_attention(q, k, v, causal=causal, q_segment_ids=q_seg,
                              kv_segment_ids=kv_seg, local_window_size=window,
                              interpret=interpret, config=config)

  segments = () if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return attend(q, k, v, *segments)
  q_spec = dividing_spec(("batch", None, "heads", None), q.shape, mesh)
  kv_spec = dividing_spec(("batch", None, "kv_heads", None), k.shape, mesh)
  seg_spec = PartitionSpec(q_spec[0], None)
  return jax.shard_map(attend, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + (seg_spec,) * len(segments),
                       out_specs=q_spec, check_vma=False)(q, k, v, *segments)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str,
                          q_segment_ids: jax.Array | None = None,
                          kv_segment_ids: jax.Array | None = None,
                          interpret: bool = False, chip: str = "",
                          sliding_window: int = 0, causal: bool = True) -> jax.Array:
  """Self-attention with a resolved `impl` ('xla' | 'cudnn' | 'pallas'), causal by default.

  q [b, t, h, d], k/v [b, t, k, d], segment ids int [b, t] or None; returns
  [b, t, h, d]. `interpret` and `chip` only affect 'pallas'. `sliding_window`
  > 0 limits each query to itself and the sliding_window - 1 keys before it.
  """
  if impl == "xla":
    if causal and default_backend() == "cpu" and q.shape[1] == k.shape[1]:
      # Same values; XLA:CPU runs it 1.5-2x as fast (layers/attention/cpu_blocked.py).
      return cpu_blocked.causal_attention(
          q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
          num_blocks=_CPU_QUERY_BLOCKS, sliding_window=sliding_window)
    mask = attention_mask(q.shape[1], k.shape[1], q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids, sliding_window=sliding_window,
                          causal=causal)
    return xla_attention(q, k, v, mask)
  if impl == "cudnn":
    return cudnn_attention(q, k, v, q_segment_ids=q_segment_ids,
                           kv_segment_ids=kv_segment_ids, sliding_window=sliding_window,
                           causal=causal)
  if impl == "pallas":
    return pallas_attention(q, k, v, q_segment_ids=q_segment_ids,
                            kv_segment_ids=kv_segment_ids, interpret=interpret, chip=chip,
                            sliding_window=sliding_window, causal=causal)
  raise ValueError(f"Unresolved attention impl {impl!r}; expected xla, cudnn or pallas.")
