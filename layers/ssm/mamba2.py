"""The Mamba-2 mixer (arXiv 2405.21060): projections, causal conv, SSD, gated RMSNorm.

x → z, xBC, dt (in projections); xBC → causal depthwise conv → SiLU → x, B, C;
dt → softplus(dt + dt_bias) clamped to `time_step_limit`; y = SSD(x, dt, A, B, C) + D·x
with A = -exp(A_log) (one scalar decay per head); y → RMSNorm(y · silu(z)) per
group of heads → out projection. Same maths and order as transformers'
`Mamba2Mixer`; its fused in_proj / conv1d are split here into named parts so
each is sharded by its own logical axes.

Shapes (layers/__init__.py): b batch, t sequence, e embed, h heads, d head dim,
N state size, ng B/C groups, w convolution width.
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from layers.linear import Einsum
from layers.ssm.conv import CausalConv
from layers.ssm.ssd import document_index, resolve_impl, ssd

_HEAD_AXES = ("batch", "length", "heads", "head_dim")
_GROUP_AXES = ("batch", "length", "ssm_groups", "ssm_state")


class _Cache(NamedTuple):
  """The 'cache' collection variables of one mixer (a recurrent state, no length axis);
  stored as conv_{x,b,c}_window, ssm_state and segment_ids."""
  conv_x: nn.Variable  # [b, w-1, h, d] the last conv inputs
  conv_b: nn.Variable  # [b, w-1, ng, N]
  conv_c: nn.Variable  # [b, w-1, ng, N]
  state: nn.Variable  # float32 [b, h, d, N] the SSM state after the last token
  segment_ids: nn.Variable  # int32 [b] the last token's segment id


def _a_log_init(key, shape, dtype):
  """log of A ~ Uniform(1, 16) (the Mamba-2 paper's range)."""
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def dt_bias_init(key, shape, dtype, dt_min=1e-3, dt_max=1e-1, floor=1e-4):
  """softplus⁻¹ of dt drawn log-uniformly in [dt_min, dt_max] (at least `floor`)."""
  u = jax.random.uniform(key, shape, jnp.float32)
  dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
  dt = jnp.maximum(dt, floor)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class GatedRMSNorm(nn.Module):
  """RMSNorm of y · silu(z) over each group of heads, in float32 (norm after the gate).

  Attributes:
    num_groups: ng; each group of h/ng heads is normalised on its own.
    eps: added to the mean square.
    dtype: dtype of the output.
    param_dtype: dtype of `scale` [h, d] (initialised to ones).
  """
  num_groups: int
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
    """y, z [b, t, h, d] -> [b, t, h, d] in `dtype`."""
    b, t, h, d = y.shape
    scale = self.param("scale", nn.with_logical_partitioning(
        nn.initializers.ones, ("heads", "head_dim")), (h, d), self.param_dtype)
    gated = y.astype(jnp.float32) * nn.silu(z.astype(jnp.float32))
    grouped = gated.reshape(b, t, self.num_groups, (h // self.num_groups) * d)
    grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True)
                                      + self.eps)
    return (grouped.reshape(b, t, h, d) * scale.astype(jnp.float32)).astype(self.dtype)


class Mamba2Mixer(nn.Module):
  """One Mamba-2 mixer: [b, t, e] -> [b, t, e].

  Parameters: in_z/kernel and in_x/kernel [e, h, d], in_b/kernel and
  in_c/kernel [e, ng, N], in_dt/kernel [e, h]; conv_x/{kernel [w, h, d],
  bias [h, d]}, conv_b and conv_c/{kernel [w, ng, N], bias [ng, N]};
  dt_bias, A_log, D [h]; norm/scale [h, d]; out/kernel [h, d, e].

  In decode mode the layer keeps a 'cache' collection (see `_Cache`): the
  conv windows, the SSM state and the last segment id. Each call continues
  from it, however many tokens it brings (a whole prompt is one chunked pass).

  Attributes:
    embed_dim: e.
    num_heads: h.
    head_dim: d (h·d is the inner width, expand·e).
    state_size: N.
    num_groups: ng; divides num_heads.
    conv_kernel: w.
    chunk_size: SSD chunk length.
    time_step_limit: (min, max) clamp of dt after the softplus.
    norm_eps: epsilon of the gated RMSNorm.
    ssm_impl: 'auto' | 'xla' | 'pallas': the SSD scan's implementation
      (layers/ssm/ssd.resolve_impl). Decode steps of one token run 'xla'.
    ssm_chip: the Pallas kernel's target chip ('' : none; 'pallas' then
      interprets the kernel, and 'auto' picks 'xla').
    dtype: computation dtype.
    param_dtype: parameter storage dtype.
  """
  embed_dim: int
  num_heads: int
  head_dim: int
  state_size: int
  num_groups: int = 1
  conv_kernel: int = 4
  chunk_size: int = 256
  time_step_limit: tuple[float, float] = (0.0, float("inf"))
  norm_eps: float = 1e-5
  ssm_impl: str = "auto"
  ssm_chip: str = ""
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
               decode: bool = False) -> jax.Array:
    """x [b, t, e] -> [b, t, e].

    Args:
      x: the normed residual stream.
      segment_ids: int [b, t]; the conv window and the state restart where the
        id changes (a packed row's documents, or left padding). None: one document.
      decode: continue from, and update, the 'cache' collection.
    """
    b, t, e = x.shape
    h, d, n, ng, w = (self.num_heads, self.head_dim, self.state_size, self.num_groups,
                      self.conv_kernel)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    heads_in = lambda name: Einsum((e, h, d), ("embed", "heads", "head_dim"),  # noqa: E731
                                   "bte,ehd->bthd", name=name, **kw)(x)
    groups_in = lambda name: Einsum((e, ng, n), ("embed", "ssm_groups", "ssm_state"),  # noqa: E731
                                    "bte,egn->btgn", name=name, **kw)(x)
    z, xs = heads_in("in_z"), heads_in("in_x")
    bmat, cmat = groups_in("in_b"), groups_in("in_c")
    dt = Einsum((e, h), ("embed", "heads"), "bte,eh->bth", name="in_dt", **kw)(x)

    cache = self._cache_variables(b) if decode else None
    previous = cache.segment_ids.value if cache is not None else None
    doc = document_index(segment_ids, (b, t), previous)
    conv = lambda name, axes, inputs: CausalConv(w, axes, name=name, **kw)(  # noqa: E731
        inputs, doc, None if cache is None else getattr(cache, name).value)
    xs, window_x = conv("conv_x", ("heads", "head_dim"), xs)
    bmat, window_b = conv("conv_b", ("ssm_groups", "ssm_state"), bmat)
    cmat, window_c = conv("conv_c", ("ssm_groups", "ssm_state"), cmat)
    xs = nn.with_logical_constraint(nn.silu(xs), _HEAD_AXES)
    bmat = nn.with_logical_constraint(nn.silu(bmat), _GROUP_AXES)
    cmat = nn.with_logical_constraint(nn.silu(cmat), _GROUP_AXES)

    heads = lambda name, init: self.param(  # noqa: E731
        name, nn.with_logical_partitioning(init, ("heads",)), (h,), self.param_dtype)
    dt_bias = heads("dt_bias", dt_bias_init)
    a_log = heads("A_log", _a_log_init)
    d_skip = heads("D", nn.initializers.ones)
    dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))
    dt = jnp.clip(dt, self.time_step_limit[0], self.time_step_limit[1])
    a = -jnp.exp(a_log.astype(jnp.float32))

    impl = resolve_impl(self.ssm_impl, backend=jax.default_backend(), chip=self.ssm_chip,
                        head_dim=d, state_size=n, chunk_size=self.chunk_size, dtype=self.dtype)
    if cache is not None and t == 1:
      impl = "xla"  # One decode step: the jnp form is one state update already.
    y, state = ssd(xs, dt, a, bmat, cmat, d_skip, chunk_size=self.chunk_size,
                   segment_ids=segment_ids,
                   initial_state=None if cache is None else cache.state.value,
                   initial_segment_ids=previous, impl=impl, chip=self.ssm_chip)
    y = checkpoint_name(nn.with_logical_constraint(y, _HEAD_AXES), "ssd")
    if cache is not None:
      cache.conv_x.value, cache.conv_b.value, cache.conv_c.value = window_x, window_b, window_c
      cache.state.value = state
      if segment_ids is not None:
        cache.segment_ids.value = segment_ids[:, -1].astype(jnp.int32)

    y = GatedRMSNorm(self.num_groups, self.norm_eps, name="norm", **kw)(y, z)
    return Einsum((h, d, e), ("heads", "head_dim", "embed"), "bthd,hde->bte",
                  num_contracting=2, name="out", **kw)(y)

  def _cache_variables(self, b: int) -> _Cache:
    """The cache variables, created as zeros if absent."""
    h, d, n, ng, w = (self.num_heads, self.head_dim, self.state_size, self.num_groups,
                      self.conv_kernel)
    zeros = lambda axes: nn.with_logical_partitioning(jnp.zeros, axes)  # noqa: E731
    var = lambda name, axes, shape, dtype: self.variable(  # noqa: E731
        "cache", name, zeros(axes), shape, dtype)
    return _Cache(
        conv_x=var("conv_x_window", ("batch", "conv_width", "heads", "head_dim"), (b, w - 1, h, d),
                   self.dtype),
        conv_b=var("conv_b_window", ("batch", "conv_width", "ssm_groups", "ssm_state"),
                   (b, w - 1, ng, n), self.dtype),
        conv_c=var("conv_c_window", ("batch", "conv_width", "ssm_groups", "ssm_state"),
                   (b, w - 1, ng, n), self.dtype),
        state=var("ssm_state", ("batch", "heads", "head_dim", "ssm_state"), (b, h, d, n),
                  jnp.float32),
        segment_ids=var("segment_ids", ("batch",), (b,), jnp.int32))
