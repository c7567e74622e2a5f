"""Grouped-query causal self-attention with RoPE and a KV cache for decoding.

Shapes: b batch, t sequence (new tokens), s cache length, h query heads,
k kv heads, d head dim, e embed.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from layers.attention import implementations
from layers.linear import Einsum
from layers.rope import apply_rope

_QUERY_AXES = ("batch", "length", "heads", "head_dim")
_KV_AXES = ("batch", "length", "kv_heads", "head_dim")
_CACHE_AXES = ("batch", "cache_length", "kv_heads", "head_dim")


class _Cache(NamedTuple):
  """The 'cache' collection variables of one attention layer."""
  key: nn.Variable  # [b, s, k, d]
  value: nn.Variable  # [b, s, k, d]
  segment_ids: nn.Variable  # [b, s]
  index: nn.Variable  # [] next slot to write


class Attention(nn.Module):
  """Llama attention: q/k/v projections, RoPE on q and k, GQA, output projection.

  Parameters: query/kernel [e, h, d], key/kernel and value/kernel [e, k, d],
  out/kernel [h, d, e]; with qkv_bias also query/bias [h, d] and key/bias,
  value/bias [k, d] (Qwen2-style; the output projection never has a bias).

  In decode mode the layer keeps a 'cache' collection: `cached_key`,
  `cached_value` [b, s, k, d], `cached_segment_ids` [b, s] and `cache_index`.
  The first decode-mode call (inside `init`) only creates it, sized by that
  call's input length s. Each later call writes its t new keys at slots
  cache_index .. cache_index + t - 1 and advances cache_index by t; writing
  past slot s - 1 is the caller's job to prevent (it would be clamped, not
  raise, under jit).

  Attributes:
    num_heads: query heads h.
    num_kv_heads: key/value heads k; divides h.
    head_dim: per-head width d.
    rope_theta: RoPE base frequency.
    qkv_bias: add learned biases to the query, key and value projections.
    attention_impl: 'xla' | 'cudnn' | 'pallas' | 'auto' (decode always uses xla).
    attention_chip: the Pallas kernel's target chip ('' on CPU: interpret mode).
    dtype: computation dtype.
    param_dtype: parameter storage dtype.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  qkv_bias: bool = False
  attention_impl: str = "auto"
  attention_chip: str = ""
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """x [b, t, e] -> [b, t, e].

    Args:
      x: input activations [b, t, e].
      positions: int [b, t] RoPE positions; default arange(t), or
        cache_index + arange(t) when decoding.
      segment_ids: int [b, t]; tokens attend causally within their own nonzero
        segment; 0 is padding. None means a single segment.
      decode: use and update the KV cache.
    """
    b, t, e = x.shape
    h, k, d = self.num_heads, self.num_kv_heads, self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q_bias = ("heads", "head_dim") if self.qkv_bias else None
    kv_bias = ("kv_heads", "head_dim") if self.qkv_bias else None
    q = Einsum((e, h, d), ("embed", "heads", "head_dim"), "bte,ehd->bthd", bias_axes=q_bias,
               name="query", **kw)(x)
    key = Einsum((e, k, d), ("embed", "kv_heads", "head_dim"), "bte,ekd->btkd",
                 bias_axes=kv_bias, name="key", **kw)(x)
    value = Einsum((e, k, d), ("embed", "kv_heads", "head_dim"), "bte,ekd->btkd",
                   bias_axes=kv_bias, name="value", **kw)(x)

    cache, decoding = self._cache_variables(b, t) if decode else (None, False)
    if positions is None:
      start = cache.index.value if decoding else 0
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    q = apply_rope(q, positions, self.rope_theta)
    key = apply_rope(key, positions, self.rope_theta)
    q = checkpoint_name(nn.with_logical_constraint(q, _QUERY_AXES), "query")
    key = checkpoint_name(nn.with_logical_constraint(key, _KV_AXES), "key")
    value = checkpoint_name(nn.with_logical_constraint(value, _KV_AXES), "value")

    if decoding:
      out = self._decode_attention(q, key, value, segment_ids, cache)
    else:
      impl = implementations.resolve_impl(
          self.attention_impl, backend=implementations.default_backend(), dtype=self.dtype,
          head_dim=d)
      out = implementations.dot_product_attention(
          q, key, value, impl=impl, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
          interpret=jax.default_backend() == "cpu", chip=self.attention_chip)
    out = checkpoint_name(nn.with_logical_constraint(out, _QUERY_AXES), "attention")
    return Einsum((h, d, e), ("heads", "head_dim", "embed"), "bthd,hde->bte", num_contracting=2,
                  name="out", **kw)(out)

  def _cache_variables(self, b: int, t: int) -> tuple[_Cache, bool]:
    """The cache variables (created [b, t, ...] if absent) and whether they existed."""
    initialized = self.has_variable("cache", "cached_key")
    shape = (b, t, self.num_kv_heads, self.head_dim)
    zeros = lambda axes: nn.with_logical_partitioning(jnp.zeros, axes)  # noqa: E731
    cached_key = self.variable("cache", "cached_key", zeros(_CACHE_AXES), shape, self.dtype)
    cached_value = self.variable("cache", "cached_value", zeros(_CACHE_AXES), shape, self.dtype)
    cached_segs = self.variable("cache", "cached_segment_ids", zeros(("batch", "cache_length")),
                                (b, t), jnp.int32)
    index = self.variable("cache", "cache_index", zeros(()), (), jnp.int32)
    return _Cache(cached_key, cached_value, cached_segs, index), initialized

  def _decode_attention(self, q, key, value, segment_ids, cache: _Cache):
    """Writes k/v [b, t, k, d] at cache_index and attends q over the whole cache."""
    cached_key, cached_value, cached_segs, index = cache
    b, t = q.shape[:2]
    s = cached_key.value.shape[1]
    if t > s:
      raise ValueError(f"Decoding {t} tokens at once into a KV cache of length {s}.")
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    start = index.value
    zero = jnp.zeros((), jnp.int32)
    keys = jax.lax.dynamic_update_slice(
        cached_key.value, key.astype(cached_key.value.dtype), (zero, start, zero, zero))
    values = jax.lax.dynamic_update_slice(
        cached_value.value, value.astype(cached_value.value.dtype), (zero, start, zero, zero))
    segs = jax.lax.dynamic_update_slice(
        cached_segs.value, segment_ids.astype(jnp.int32), (zero, start))
    cached_key.value, cached_value.value, cached_segs.value = keys, values, segs
    index.value = start + t
    mask = implementations.attention_mask(t, s, q_segment_ids=segment_ids, kv_segment_ids=segs,
                                        q_offset=start)
    return implementations.xla_attention(q, keys, values, mask)
