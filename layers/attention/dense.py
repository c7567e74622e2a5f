"""Grouped-query causal self-attention with RoPE and a KV cache for decoding.

Options the dense decoders need: RoPE frequency scaling (layers/rope.py),
per-head RMSNorm on queries and keys before RoPE (Qwen3, Gemma 3), a query
scale other than 1/sqrt(d) (Gemma's query_pre_attn_scalar), and a sliding
window (Mistral, Gemma local layers) whose decode cache is a rolling buffer of
the window's size.

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
from layers.norms import RMSNorm
from layers.rope import RopeScaling, apply_rope

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

  With qk_norm also query_norm/scale and key_norm/scale [d].

  In decode mode the layer keeps a 'cache' collection: `cached_key`,
  `cached_value` [b, s, k, d], `cached_segment_ids` [b, s] and `cache_index`.
  The first decode-mode call (inside `init`) only creates it, sized by that
  call's input length (the capacity), or by sliding_window if that is
  smaller. Each later call writes its t new keys and advances cache_index by
  t. A full-size cache holds token n at slot n; writing past the capacity is
  the caller's job to prevent (it would be clamped, not raise, under jit). A
  window-sized cache is rolling: token n goes to slot n mod s, overwriting a
  token the window no longer reaches, so decode memory stays bounded.

  Attributes:
    num_heads: query heads h.
    num_kv_heads: key/value heads k; divides h.
    head_dim: per-head width d.
    rope_theta: RoPE base frequency.
    rope_scaling: RoPE frequency scaling (None: plain RoPE).
    qkv_bias: add learned biases to the query, key and value projections.
    qk_norm: RMSNorm each query and key head (over d) before RoPE.
    norm_eps: epsilon of the query/key norms.
    norm_plus_one: the query/key norms scale by 1 + w (Gemma).
    query_pre_attn_scalar: scores are q.k / sqrt(this); 0 means d.
    sliding_window: > 0: each query sees itself and the sliding_window - 1
      tokens before it (and the decode cache holds only that many).
    attention_impl: 'xla' | 'cudnn' | 'pallas' | 'auto' (decode always uses xla).
    attention_chip: the Pallas kernel's target chip ('' on CPU: interpret mode).
    dtype: computation dtype.
    param_dtype: parameter storage dtype.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-6
  norm_plus_one: bool = False
  query_pre_attn_scalar: float = 0.0
  sliding_window: int = 0
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
    if self.qk_norm:
      norm = dict(eps=self.norm_eps, scale_plus_one=self.norm_plus_one, scale_axis="head_dim",
                  **kw)
      q = RMSNorm(name="query_norm", **norm)(q)
      key = RMSNorm(name="key_norm", **norm)(key)
    q = apply_rope(q, positions, self.rope_theta, self.rope_scaling)
    key = apply_rope(key, positions, self.rope_theta, self.rope_scaling)
    if self.query_pre_attn_scalar:
      # Every implementation scales scores by 1/sqrt(d); this makes it 1/sqrt(scalar).
      q = q * jnp.asarray((d / self.query_pre_attn_scalar) ** 0.5, q.dtype)
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
          interpret=jax.default_backend() == "cpu", chip=self.attention_chip,
          sliding_window=self.sliding_window)
    out = checkpoint_name(nn.with_logical_constraint(out, _QUERY_AXES), "attention")
    return Einsum((h, d, e), ("heads", "head_dim", "embed"), "bthd,hde->bte", num_contracting=2,
                  name="out", **kw)(out)

  def _cache_variables(self, b: int, t: int) -> tuple[_Cache, bool]:
    """The cache variables (created [b, min(t, window), ...] if absent) and whether they
    existed."""
    initialized = self.has_variable("cache", "cached_key")
    if self.sliding_window:
      t = min(t, self.sliding_window)
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
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    if self.sliding_window and s <= self.sliding_window:
      return self._rolling_decode_attention(q, key, value, segment_ids, cache)
    if t > s:
      raise ValueError(f"Decoding {t} tokens at once into a KV cache of length {s}.")
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
                                        q_offset=start, sliding_window=self.sliding_window)
    return implementations.xla_attention(q, keys, values, mask)

  def _rolling_decode_attention(self, q, key, value, segment_ids, cache: _Cache):
    """Attends q over the rolling cache and the t new keys, then keeps the last s.

    Cache slot j holds the latest token n < cache_index with n = j (mod s); the
    t new tokens are cache_index .. cache_index + t - 1 (any t, a long prompt
    included: its queries see the earlier prompt tokens before they roll out).
    """
    cached_key, cached_value, cached_segs, index = cache
    t = q.shape[1]
    s = cached_key.value.shape[1]
    start = index.value
    slots = jnp.arange(s, dtype=jnp.int32)
    held = start - 1 - jnp.mod(start - 1 - slots, s)  # Token in each slot; < 0 if empty.
    new = start + jnp.arange(t, dtype=jnp.int32)
    keys = jnp.concatenate([cached_key.value, key.astype(cached_key.value.dtype)], axis=1)
    values = jnp.concatenate([cached_value.value, value.astype(cached_value.value.dtype)], axis=1)
    segs = jnp.concatenate([cached_segs.value, segment_ids.astype(jnp.int32)], axis=1)
    mask = implementations.attention_mask(
        t, s + t, q_segment_ids=segment_ids, kv_segment_ids=segs, q_offset=start,
        sliding_window=self.sliding_window, kv_slots=jnp.concatenate([held, new]))
    out = implementations.xla_attention(q, keys, values, mask)
    kept = min(t, s)  # Only the last s new tokens can stay.
    write = jnp.mod(new[t - kept:], s)
    cached_key.value = cached_key.value.at[:, write].set(keys[:, s + t - kept:])
    cached_value.value = cached_value.value.at[:, write].set(values[:, s + t - kept:])
    cached_segs.value = cached_segs.value.at[:, write].set(segs[:, s + t - kept:])
    index.value = start + t
    return out
