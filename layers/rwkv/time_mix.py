"""The RWKV-7 time mix (arXiv 2503.14456): token shift, low-rank decay, in-context
learning rate, value residual, gate, the WKV-7 recurrence, per-head GroupNorm and bonus.

For normed inputs x and the previous token x' (token shift), with δ = x' − x:

    x_c = x + δ·μ_c  for c in r, w, k, v, a, g          (six learned lerps μ)
    r, k, v = x_r R, x_k K, x_v V
    w = exp(−e^{−1/2} · σ(w0 + tanh(x_w W1) W2))       (decay per channel, in (0.54, 1))
    a = σ(a0 + x_a A1 A2)                                (in-context learning rate)
    g = σ(x_g G1) G2                                     (output gate)
    k̂ = normalize(k·k_k) per head;  k ← k·(1 + (a − 1)·k_a)
    v ← v + (v_first − v)·σ(v0 + x_v V1 V2)              (layers after the first)
    y = WKV7(r, w, k, v, −k̂, k̂·a);  y = GroupNorm_h(y) + (Σ_d r·k·r_k)·v
    out = (y·g) O

The same maths and order as the reference `rwkv` package's v7 path; the
initial values depend on the layer's depth (layers/rwkv/initializers.py).

Shapes (layers/__init__.py): b batch, t sequence, e embed, h heads, d head size,
R low-rank width.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from layers.linear import Einsum
from layers.rwkv import initializers as rwkv_init
from layers.rwkv.token_shift import token_shift
from layers.rwkv.wkv7 import resolve_impl, wkv7_apply

_HEAD_AXES = ("batch", "length", "heads", "head_dim")
DECAY_SCALE = math.exp(-0.5)
GROUP_NORM_EPS = 64e-5


def group_norm_heads(y: jax.Array, scale: jax.Array, bias: jax.Array,
                     eps: float = GROUP_NORM_EPS) -> jax.Array:
  """LayerNorm of each head's d channels (torch GroupNorm with h groups), float32.

  y [b, t, h, d]; scale, bias [h, d].
  """
  y = y.astype(jnp.float32)
  mean = jnp.mean(y, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
  return (y - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(
      jnp.float32)


class TimeMix(nn.Module):
  """One RWKV-7 time mix: [b, t, e] -> [b, t, e].

  Parameters: x_r, x_w, x_k, x_v, x_a, x_g [e] (lerps); w0, a0 [e]; w1 [e, R_w],
  w2 [R_w, e]; a1 [e, R_a], a2 [R_a, e]; v0 [e], v1 [e, R_v], v2 [R_v, e] (only
  with `value_residual`); g1 [e, R_g], g2 [R_g, e]; k_k, k_a, r_k [h, d];
  receptance, key, value/kernel [e, h, d]; output/kernel [h, d, e];
  ln_x/{scale, bias} [h, d].

  Attributes:
    num_heads: h (h·d = e).
    head_size: d.
    decay_rank, iclr_rank, value_rank, gate_rank: low-rank widths R_w, R_a, R_v, R_g.
    chunk_size: tokens per chunk of the WKV-7 matrix form (`wkv7_chunked` or the
      kernel); 0 runs the sequential scan (`wkv7`), as does a call of a single token
      (decode steps stay sequential whatever `rwkv_impl`).
    rwkv_impl: 'xla' (jnp chunked form) | 'pallas' (pallas_kernels.wkv7) | 'auto'
      (layers.rwkv.wkv7.resolve_impl: the kernel where `rwkv_chip` is set and served).
    rwkv_chip: the kernel's target chip ('' : none; 'pallas' then interprets on CPU).
    value_residual: mix in the first layer's values (every layer but the first).
    num_layers: L, for the depth-dependent initial values.
    dtype: computation dtype of the projections (decay, gates and the state are float32).
    param_dtype: parameter storage dtype.
  """
  num_heads: int
  head_size: int
  decay_rank: int
  iclr_rank: int
  value_rank: int
  gate_rank: int
  chunk_size: int = 16
  rwkv_impl: str = "auto"
  rwkv_chip: str = ""
  value_residual: bool = True
  num_layers: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _vector(self, name, init, e):
    return self.param(name, nn.with_logical_partitioning(init, ("embed",)), (e,),
                      self.param_dtype).astype(jnp.float32)

  def _low_rank(self, name_in, name_out, x, rank, inner=None):
    """(inner(x W_in)) W_out in float32: x [b, t, e] -> [b, t, e]."""
    e = x.shape[-1]
    w_in = self.param(name_in, nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            ("embed", "low_rank")),
                      (e, rank), self.param_dtype)
    w_out = self.param(name_out, nn.with_logical_partitioning(
        rwkv_init.orthogonal(rwkv_init.low_rank_out_gain(rank, e)), ("low_rank", "embed")),
        (rank, e), self.param_dtype)
    hidden = jnp.einsum("bte,er->btr", x, w_in.astype(jnp.float32))
    if inner is not None:
      hidden = inner(hidden)
    return jnp.einsum("btr,re->bte", hidden, w_out.astype(jnp.float32))

  @nn.compact
  def __call__(self, x: jax.Array, v_first: jax.Array | None, doc: jax.Array | None = None,
               previous: jax.Array | None = None, state: jax.Array | None = None,
               depth: jax.Array | int = 0):
    """The time mix of normed inputs.

    Args:
      x: [b, t, e] the normed residual stream.
      v_first: [b, t, h, d] the first layer's values (ignored without `value_residual`).
      doc: int [b, t] document index (layers.ssm.document_index); None: one document.
      previous: [b, e] the token before x[:, 0] (decoding), or None.
      state: float32 [b, h, d, d] the WKV state before x[:, 0] (decoding), or None.
      depth: this layer's index l in 0..L-1 (int or traced int scalar); sets the
        initial values only.
    Returns:
      (out [b, t, e] in `dtype`, this layer's values v [b, t, h, d] (before the
      value residual: the v_first of later layers), the last token [b, e], the
      float32 state after the last token [b, h, d, d]).
    """
    b, t, e = x.shape
    h, d = self.num_heads, self.head_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shifted, last = token_shift(x, doc, previous)
    x32 = x.astype(jnp.float32)
    delta = shifted.astype(jnp.float32) - x32
    lerp = lambda c, p: self._vector(  # noqa: E731
        f"x_{c}", rwkv_init.token_shift_lerp(p, depth, self.num_layers), e)
    mixed = {c: x32 + delta * lerp(c, p) for c, p in rwkv_init.TIME_MIX_LERP_POWERS}

    heads_in = lambda name, inputs, gain: Einsum(  # noqa: E731
        (e, h, d), ("embed", "heads", "head_dim"), "bte,ehd->bthd", name=name,
        kernel_init=rwkv_init.orthogonal(gain), **kw)(inputs)
    r = heads_in("receptance", mixed["r"], 1.0).astype(jnp.float32)
    k = heads_in("key", mixed["k"], rwkv_init.KEY_GAIN).astype(jnp.float32)
    v = heads_in("value", mixed["v"], 1.0).astype(jnp.float32)
    split = lambda y: y.reshape(b, t, h, d)  # noqa: E731

    w = (self._vector("w0", rwkv_init.decay_offset(d, depth, self.num_layers), e)
         + self._low_rank("w1", "w2", mixed["w"], self.decay_rank, jnp.tanh))
    w = jnp.exp(-DECAY_SCALE * jax.nn.sigmoid(split(w)))
    a = jax.nn.sigmoid(split(self._vector("a0", rwkv_init.iclr_offset(d), e)
                             + self._low_rank("a1", "a2", mixed["a"], self.iclr_rank)))
    g = split(self._low_rank("g1", "g2", mixed["g"], self.gate_rank, jax.nn.sigmoid))

    per_head = lambda name, init: self.param(  # noqa: E731
        name, nn.with_logical_partitioning(init, ("heads", "head_dim")),
        (h, d), self.param_dtype).astype(jnp.float32)
    k_k = per_head("k_k", rwkv_init.key_norm_scale())
    k_a = per_head("k_a", nn.initializers.constant(1.02))
    r_k = per_head("r_k", nn.initializers.constant(-0.04))
    kk = k * k_k
    kk = kk / jnp.maximum(jnp.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)
    k = k * (1.0 + (a - 1.0) * k_a)
    values = v
    if self.value_residual:
      mix = jax.nn.sigmoid(split(self._vector("v0", rwkv_init.value_mix_offset(), e)
                                 + self._low_rank("v1", "v2", mixed["v"], self.value_rank)))
      v = v + (v_first.astype(jnp.float32) - v) * mix

    r, w, k, v, kk, a = (nn.with_logical_constraint(z, _HEAD_AXES) for z in (r, w, k, v, kk, a))
    impl = resolve_impl(self.rwkv_impl, chip=self.rwkv_chip, head_size=d,
                        chunk_size=self.chunk_size)
    y, state = wkv7_apply(r, w, k, v, -kk, kk * a, impl=impl, chip=self.rwkv_chip,
                          chunk_size=self.chunk_size, doc=doc, initial_state=state)
    y = checkpoint_name(nn.with_logical_constraint(y, _HEAD_AXES), "wkv")

    ln_scale = self.param("ln_x_scale", nn.with_logical_partitioning(
        rwkv_init.group_norm_scale(depth, self.num_layers), ("heads", "head_dim")), (h, d),
        self.param_dtype)
    ln_bias = self.param("ln_x_bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("heads", "head_dim")), (h, d), self.param_dtype)
    y = group_norm_heads(y, ln_scale, ln_bias)
    y = y + jnp.sum(r * k * r_k, axis=-1, keepdims=True) * v
    y = (y * g).astype(self.dtype)
    out = Einsum((h, d, e), ("heads", "head_dim", "embed"), "bthd,hde->bte",
                 num_contracting=2, name="output", kernel_init=nn.initializers.zeros_init(),
                 **kw)(y)
    return out, values.astype(self.dtype), last, state
