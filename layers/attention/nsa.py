"""Native Sparse Attention (DeepSeek, arXiv 2502.11089) as a drop-in for `Attention`.

Shapes: see layers/__init__.py (here b, t, s, e, h, k, g, d; l compress_block,
st compress_stride, nc compressed blocks, B select_block, ns selected blocks per
query).

Each query mixes three causal attentions with learned per-head sigmoid gates
(gate = sigmoid(x W_gate) [b, t, h, 3]):
  cmp: over compressed blocks (nsa_compression.py);
  slc: over the top-ns selection blocks its kv-head group picks from the
    compressed branch's probabilities (always with the first and local blocks);
  win: over the last `window` tokens.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from layers.attention import implementations
from layers.attention import nsa_compression as cmp_lib
from layers.linear import Einsum
from layers.rope import apply_rope

_QUERY_AXES = ("batch", "length", "heads", "head_dim")
_KV_AXES = ("batch", "length", "kv_heads", "head_dim")
_INDEX_AXES = ("batch", "length", "kv_heads", None)
_CACHE_AXES = ("batch", "cache_length", "kv_heads", "head_dim")
BRANCHES = ("cmp", "slc", "win")


class _Cache(NamedTuple):
  """The 'cache' collection variables of one NSA layer."""
  keys: dict[str, nn.Variable]  # branch -> [b, s, k, d] (rotated)
  values: dict[str, nn.Variable]  # branch -> [b, s, k, d]
  compressed: tuple[nn.Variable, nn.Variable]  # compressed key, value [b, nc, k, d]
  segment_ids: nn.Variable  # [b, s]
  index: nn.Variable  # [] next slot to write


def resolve_impl(impl: str, *, backend: str, dtype, head_dim: int, select_block: int,
                 group: int) -> str:
  """NSA's 'auto' made concrete; 'xla' and 'pallas' pass through.

  'auto' is 'pallas' where the kernels take the shapes: on TPU (float32 or
  bfloat16), and on CUDA for the Mosaic GPU kernels' shapes (bfloat16 or
  float16, head_dim and select_block multiples of 64, at most 64 query heads
  per kv head). Elsewhere, CPU included (Pallas would run interpreted), it is
  'xla', whose dense [t, s] masks limit it to short sequences.
  """
  if impl != "auto":
    return impl
  dtype = jnp.dtype(dtype)
  if backend == "tpu":
    return "pallas" if dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)) else "xla"
  if backend == "cuda":
    half = dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    fits = head_dim % 64 == 0 and head_dim <= 256 and select_block % 64 == 0 and group <= 64
    return "pallas" if half and fits else "xla"
  return "xla"


class NativeSparseAttention(nn.Module):
  """NSA: compressed, selected and sliding-window attention, gated per head.

  Parameters: query/kernel [e, h, d] (one query shared by the branches);
  key_{cmp,slc,win}/kernel and value_{cmp,slc,win}/kernel [e, k, d] (separate
  keys and values per branch, as in the paper, so a branch's keys need not
  serve the others' scoring); compress_key and compress_value (CompressKV:
  pos [l, k, d], w1 [l, d, d], w2 [d, d]); gate/kernel [e, h, 3]; out/kernel
  [h, d, e]. RoPE rotates q and every branch's per-token keys; compressed keys
  are built from rotated keys.

  The chosen blocks are sown as intermediates/block_indices (int32 [b, t, k, ns],
  -1 for unused slots) when the 'intermediates' collection is mutable.

  Segment ids (packed rows) are supported: every branch attends within the
  query's segment, a compressed block counts only if it lies wholly inside
  the segment, and the forced "first block" is the block of the segment's
  first token. Id 0 (padding) is an ordinary segment here: padding attends to
  earlier padding, real tokens never to padding. Blocks are counted in slots,
  so a left-padded prompt's blocks are shifted by its padding, exactly as for a
  document packed at that offset in training.

  In decode mode the layer keeps a 'cache' collection: cached_key_{cmp,slc,win}
  and cached_value_{cmp,slc,win} [b, s, k, d] (keys after RoPE),
  cached_compressed_key / cached_compressed_value [b, nc, k, d] (nc whole
  compressed blocks of s slots), cached_segment_ids [b, s] and cache_index [].
  As in `Attention`, the first decode-mode call (inside `init`) only creates
  the cache, sized by its input length s; each later call writes its t tokens
  at cache_index, builds the compressed blocks those tokens complete, and
  attends with the training math counted in cache slots (einsum path), so
  decoding token by token reproduces a full forward over the same slots.
  Writing past slot s - 1 is the caller's job to prevent.

  Attributes:
    num_heads: h; num_kv_heads: k (divides h; the selection is shared per group).
    head_dim: d; rope_theta: RoPE base.
    compress_block, compress_stride: l and st of the compressed blocks.
    select_block: B, tokens per selection block; select_top_n: ns (capped at
      the number of blocks); select_local_blocks: the query's own block and
      the ones before it that are always selected (with the first block, these
      count toward ns).
    window: sliding-window length (the query and the window - 1 before it).
    attention_impl: 'auto' | 'xla' | 'pallas'. 'pallas' runs the selection
      kernels (pallas_kernels/nsa_selection: Mosaic TPU kernels on TPU chips,
      Mosaic GPU kernels on h100/h200, interpreted on CPU) and flash attention
      for the window; 'xla' runs einsum references; 'auto' see `resolve_impl`.
      Decoding always uses the einsum path.
    attention_chip: the kernels' target chip ('' : interpret on CPU, else the
      local device's chip).
    dtype, param_dtype: computation and parameter dtypes.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  compress_block: int = 32
  compress_stride: int = 16
  select_block: int = 64
  select_top_n: int = 16
  select_local_blocks: int = 2
  window: int = 512
  attention_impl: str = "auto"
  attention_chip: str = ""
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _check(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")
    if self.compress_block % self.compress_stride:
      raise ValueError(f"compress_block={self.compress_block} must be a multiple of "
                       f"compress_stride={self.compress_stride}.")
    if self.select_top_n < 1 + self.select_local_blocks or self.select_local_blocks < 1:
      raise ValueError(f"select_top_n={self.select_top_n} must be >= 1 + "
                       f"select_local_blocks={self.select_local_blocks} >= 2.")
    if self.window < 1:
      raise ValueError(f"window={self.window} must be >= 1.")
    if self.attention_impl not in ("auto", "xla", "pallas"):
      raise ValueError(f"attention_impl={self.attention_impl!r}; NSA takes 'auto', 'xla' "
                       "or 'pallas'.")

  def _impl(self) -> str:
    return resolve_impl(self.attention_impl, backend=implementations.default_backend(),
                        dtype=self.dtype, head_dim=self.head_dim,
                        select_block=self.select_block,
                        group=self.num_heads // self.num_kv_heads)

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """x [b, t, e] -> [b, t, e].

    Args:
      x: input activations [b, t, e].
      positions: int [b, t] RoPE positions; default arange(t), or
        cache_index + arange(t) when decoding.
      segment_ids: int [b, t]; tokens attend causally within their own segment
        (0, padding, is a segment no other id sees). None means one segment.
      decode: use and update the KV cache (see the class docstring).
    """
    self._check()
    b, t, e = x.shape
    h, k, d = self.num_heads, self.num_kv_heads, self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cache, decoding = self._cache_variables(b, t) if decode else (None, False)
    if positions is None:
      start = cache.index.value if decoding else 0
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    q = Einsum((e, h, d), ("embed", "heads", "head_dim"), "bte,ehd->bthd", name="query", **kw)(x)
    q = apply_rope(q, positions, self.rope_theta)
    q = checkpoint_name(nn.with_logical_constraint(q, _QUERY_AXES), "query")
    keys, values = {}, {}
    for branch in BRANCHES:
      proj = lambda name: Einsum((e, k, d), ("embed", "kv_heads", "head_dim"),  # noqa: E731
                                 "bte,ekd->btkd", name=name, **kw)(x)
      key = apply_rope(proj(f"key_{branch}"), positions, self.rope_theta)
      keys[branch] = checkpoint_name(nn.with_logical_constraint(key, _KV_AXES), f"key_{branch}")
      values[branch] = checkpoint_name(
          nn.with_logical_constraint(proj(f"value_{branch}"), _KV_AXES), f"value_{branch}")
    compress = dict(block=self.compress_block, stride=self.compress_stride, **kw)
    compressors = (cmp_lib.CompressKV(name="compress_key", **compress),
                   cmp_lib.CompressKV(name="compress_value", **compress))

    if decoding:
      outs, block_indices = self._decode(q, keys, values, segment_ids, cache, compressors)
    else:
      outs, block_indices = self._forward(q, keys, values, segment_ids, compressors)
    self.sow("intermediates", "block_indices", block_indices)

    gate = Einsum((e, h, 3), ("embed", "heads", None), "bte,ehr->bthr", name="gate", **kw)(x)
    gate = jax.nn.sigmoid(gate.astype(jnp.float32))
    branches = jnp.stack(outs, axis=-1).astype(jnp.float32)
    out = jnp.einsum("bthdr,bthr->bthd", branches, gate).astype(self.dtype)
    out = checkpoint_name(nn.with_logical_constraint(out, _QUERY_AXES), "attention")
    return Einsum((h, d, e), ("heads", "head_dim", "embed"), "bthd,hde->bte", num_contracting=2,
                  name="out", **kw)(out)

  def _forward(self, q, keys, values, segment_ids, compressors):
    """Training / full-sequence branches: ([cmp, slc, win] each [b, t, h, d], indices)."""
    t = q.shape[1]
    ck, cv = (fn(x) for fn, x in zip(compressors, (keys["cmp"], values["cmp"])))
    mask = cmp_lib.compressed_mask(t, self.compress_block, self.compress_stride, segment_ids)
    out_cmp, probs = cmp_lib.grouped_attention(q, ck, cv, mask)
    block_indices = self._select(probs, t, segment_ids)
    impl = self._impl()
    out_slc = self._selected(impl, q, keys["slc"], values["slc"], block_indices, segment_ids)
    out_win = self._window(impl, q, keys["win"], values["win"], segment_ids)
    return (out_cmp, out_slc, out_win), block_indices

  def _select(self, probs, t, segment_ids, **slots):
    """Top-ns selection blocks [b, t, k, ns] (slots: kv_len, q_offset, kv_segment_ids)."""
    block_indices = cmp_lib.select_blocks(
        probs, t=t, block=self.compress_block, stride=self.compress_stride,
        select_block=self.select_block, top_n=self.select_top_n,
        local_blocks=self.select_local_blocks, segment_ids=segment_ids, **slots)
    return nn.with_logical_constraint(block_indices, _INDEX_AXES)

  def _cache_variables(self, b: int, t: int) -> tuple[_Cache, bool]:
    """The cache variables (created for t slots if absent) and whether they existed."""
    initialized = self.has_variable("cache", "cache_index")
    k, d = self.num_kv_heads, self.head_dim
    nc = cmp_lib.num_compressed(t, self.compress_block, self.compress_stride)
    zeros = lambda axes: nn.with_logical_partitioning(jnp.zeros, axes)  # noqa: E731
    var = lambda name, shape: self.variable(  # noqa: E731
        "cache", name, zeros(_CACHE_AXES), shape, self.dtype)
    keys = {br: var(f"cached_key_{br}", (b, t, k, d)) for br in BRANCHES}
    values = {br: var(f"cached_value_{br}", (b, t, k, d)) for br in BRANCHES}
    compressed = (var("cached_compressed_key", (b, nc, k, d)),
                  var("cached_compressed_value", (b, nc, k, d)))
    segs = self.variable("cache", "cached_segment_ids", zeros(("batch", "cache_length")),
                         (b, t), jnp.int32)
    index = self.variable("cache", "cache_index", zeros(()), (), jnp.int32)
    return _Cache(keys, values, compressed, segs, index), initialized

  def _decode(self, q, keys, values, segment_ids, cache: _Cache, compressors):
    """Writes the t new tokens at cache_index, then runs every branch over the cache.

    The same masks and selection as `_forward`, counted in cache slots (einsum
    path, whatever attention_impl says). Compressed blocks are built once,
    when the call that writes their last token runs.
    """
    b, t = q.shape[:2]
    s = cache.segment_ids.value.shape[1]
    if t > s:
      raise ValueError(f"Decoding {t} tokens at once into an NSA KV cache of length {s}.")
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    start = cache.index.value

    def write(var, new):
      at = (jnp.zeros((), jnp.int32), start) + (jnp.zeros((), jnp.int32),) * (new.ndim - 2)
      var.value = jax.lax.dynamic_update_slice(var.value, new.astype(var.value.dtype), at)
      return var.value
    segs = write(cache.segment_ids, segment_ids)
    kv = {br: (write(cache.keys[br], keys[br]), write(cache.values[br], values[br]))
          for br in BRANCHES}
    cache.index.value = start + t
    ck, cv = self._update_compressed(cache.compressed, kv["cmp"], start, t, compressors)

    slots = dict(kv_len=s, q_offset=start, kv_segment_ids=segs)
    mask = cmp_lib.compressed_mask(t, self.compress_block, self.compress_stride, segment_ids,
                                   **slots)
    out_cmp, probs = cmp_lib.grouped_attention(q, ck, cv, mask)
    block_indices = self._select(probs, t, segment_ids, **slots)
    mask = cmp_lib.selection_mask(block_indices, t=t, select_block=self.select_block,
                                  segment_ids=segment_ids, **slots)
    out_slc = cmp_lib.grouped_attention(q, *kv["slc"], mask)[0]
    out_win = _window_xla(q, *kv["win"], self.window, segment_ids, segs, start)
    return (out_cmp, out_slc, out_win), block_indices

  def _update_compressed(self, compressed, cmp_kv, start, t, compressors):
    """Builds the compressed blocks whose last token lies in slots start .. start + t - 1.

    Returns the updated cached compressed keys and values [b, nc, k, d].
    """
    l, st = self.compress_block, self.compress_stride
    nc = compressed[0].value.shape[1]
    candidates = min(-(-t // st), nc)  # at most ceil(t / st) blocks end among t slots
    if candidates == 0:
      return tuple(var.value for var in compressed)
    first = jnp.maximum(0, -((l - 1 - start) // st))  # first block ending at or after start
    ids = first + jnp.arange(candidates, dtype=jnp.int32)
    done = (ids * st + l - 1 <= start + t - 1) & (ids < nc)
    target = jnp.where(done, ids, nc)  # nc: out of range, dropped
    for var, fn, x in zip(compressed, compressors, cmp_kv):
      new = fn(x, blocks=ids).astype(var.value.dtype)
      var.value = var.value.at[:, target].set(new, mode="drop")
    return tuple(var.value for var in compressed)

  def _kernel_kwargs(self):
    from pallas_kernels.common import config as fa  # pylint: disable=g-import-not-at-top
    config = fa.FlashAttentionConfig(chip=self.attention_chip) if self.attention_chip else None
    return dict(interpret=jax.default_backend() == "cpu", config=config)

  def _selected(self, impl, q, k, v, block_indices, segment_ids):
    """Selection branch: [b, t, h, d]."""
    t = q.shape[1]
    if impl == "xla":
      mask = cmp_lib.selection_mask(block_indices, t=t, select_block=self.select_block,
                                    segment_ids=segment_ids)
      out = cmp_lib.grouped_attention(q, k, v, mask)[0]
    else:
      # pylint: disable-next=g-import-not-at-top
      from pallas_kernels.nsa_selection import selected_block_attention
      kw = self._kernel_kwargs()

      def attend(q, k, v, idx, *seg):
        ids = dict(q_segment_ids=seg[0], kv_segment_ids=seg[0]) if seg else {}
        return selected_block_attention(q, k, v, idx, block_size=self.select_block, **ids, **kw)
      out = _per_shard(attend, q, k, v, block_indices, segment_ids)
    return checkpoint_name(nn.with_logical_constraint(out, _QUERY_AXES), "attention_slc")

  def _window(self, impl, q, k, v, segment_ids):
    """Sliding-window branch: [b, t, h, d]."""
    if impl == "xla":
      out = _window_xla(q, k, v, self.window, segment_ids, segment_ids, 0)
    else:
      # pylint: disable-next=g-import-not-at-top
      from pallas_kernels.flash_attention import flash_attention
      kw = self._kernel_kwargs()

      def attend(q, k, v, *seg):
        ids = dict(q_segment_ids=seg[0], kv_segment_ids=seg[0]) if seg else {}
        return flash_attention(q, k, v, causal=True, local_window_size=(self.window - 1, 0),
                               **ids, **kw)
      out = _per_shard(attend, q, k, v, None, segment_ids)
    return checkpoint_name(nn.with_logical_constraint(out, _QUERY_AXES), "attention_win")


def _window_xla(q, k, v, window: int, segment_ids, kv_segment_ids, q_offset):
  """Sliding-window attention by einsum: q [b, t, h, d] at slots q_offset.., k/v [b, s, k, d].

  Like the flash kernel, segment 0 is an ordinary segment here (padding sees
  earlier padding), so no row is empty and none sees a later slot.
  """
  t, s = q.shape[1], k.shape[1]
  rows = q_offset + jnp.arange(t)[:, None]
  cols = jnp.arange(s)[None, :]
  mask = ((cols <= rows) & (cols > rows - window))[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return cmp_lib.grouped_attention(q, k, v, mask[:, None])[0]


def _per_shard(fn, q, k, v, block_indices, segment_ids):
  """fn(q, k, v[, block_indices][, segment_ids]) per shard of batch and heads (shard_map).

  Without a mesh (or on one device) calls fn directly.
  """
  args = [q, k, v] + ([block_indices] if block_indices is not None else [])
  args += [segment_ids] if segment_ids is not None else []
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  dividing = implementations.dividing_spec
  q_spec = dividing(("batch", None, "heads", None), q.shape, mesh)
  kv_spec = dividing(("batch", None, "kv_heads", None), k.shape, mesh)
  if kv_spec[2] != q_spec[2]:  # Heads and kv heads must split alike to keep groups whole.
    q_spec = PartitionSpec(q_spec[0], None, None, None)
    kv_spec = PartitionSpec(q_spec[0], None, None, None)
  specs = [q_spec, kv_spec, kv_spec]
  if block_indices is not None:
    specs.append(PartitionSpec(kv_spec[0], None, kv_spec[2], None))
  if segment_ids is not None:
    specs.append(PartitionSpec(q_spec[0], None))
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec,
                       check_vma=False)(*args)
