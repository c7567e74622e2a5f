"""The Mamba-1 mixer (arXiv 2312.00752): projections, causal conv, selective scan, gate.

x → (x, z) by the input projection; x → causal depthwise conv (+ bias) → SiLU;
the conv output makes the selective parameters: dt (a rank-R projection, then
dt_proj with a bias, then softplus), B and C [N]; y = selective_scan(x, dt, A, B, C) + D·x
with A = -exp(A_log) [i, N] (one decay per channel and state); y · silu(z) →
out projection. Same maths and order as transformers' `MambaMixer`
(slow_forward); its fused in_proj / x_proj are split here into named parts
(in_x, in_z; x_dt, x_b, x_c) so each has its own logical axes.

Shapes (layers/__init__.py): b batch, t sequence, e embed, i inner width,
N state size, R the dt rank, w convolution width.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from layers.linear import Einsum
from layers.ssm.conv import CausalConv
from layers.ssm.mamba2 import dt_bias_init
from layers.ssm.selective_scan import selective_scan
from layers.ssm.ssd import document_index

_INNER_AXES = ("batch", "length", "mlp")


class _Cache(NamedTuple):
  """The 'cache' collection variables of one mixer (a recurrent state, no length axis)."""
  conv: nn.Variable  # [b, w-1, i] the last conv inputs ('conv_window')
  state: nn.Variable  # float32 [b, i, N] the state after the last token ('ssm_state')
  segment_ids: nn.Variable  # int32 [b] the last token's segment id


def _a_log_init(key, shape, dtype):
  """log(1 .. N) for every channel (S4D-real, as transformers' MambaMixer)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=jnp.float32)),
                          shape).astype(dtype)


class TimeStepProjection(nn.Module):
  """dt = softplus(dt_low · kernel + bias): the rank-R step size of each inner channel.

  The kernel starts uniform in ±R^-1/2, the bias at softplus⁻¹ of a step drawn
  log-uniformly in [1e-3, 1e-1] (transformers' and mamba_ssm's init).

  Attributes:
    inner_dim: i.
    dtype: dtype of the projection (the softplus is float32).
    param_dtype: storage dtype of kernel [R, i] and bias [i].
  """
  inner_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, dt_low: jax.Array) -> jax.Array:
    """dt_low [b, t, R] -> float32 dt [b, t, i] (positive)."""
    rank = dt_low.shape[-1]
    bound = rank ** -0.5
    init = lambda key, shape, dtype: jax.random.uniform(  # noqa: E731
        key, shape, dtype, -bound, bound)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, ("low_rank", "mlp")),
                        (rank, self.inner_dim), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(dt_bias_init, ("mlp",)),
                      (self.inner_dim,), self.param_dtype)
    dt = jnp.einsum("btr,ri->bti", dt_low.astype(self.dtype), kernel.astype(self.dtype),
                    preferred_element_type=jnp.float32)
    return jax.nn.softplus(dt + bias.astype(jnp.float32))


class Mamba1Mixer(nn.Module):
  """One Mamba-1 mixer: [b, t, e] -> [b, t, e].

  Parameters: in_x/kernel and in_z/kernel [e, i] (+ bias [i] if use_bias);
  conv/{kernel [w, i], bias [i] if use_conv_bias}; x_dt/kernel [i, R],
  x_b/kernel and x_c/kernel [i, N]; dt_proj/{kernel [R, i], bias [i]};
  A_log [i, N]; D [i]; out/kernel [i, e] (+ bias [e] if use_bias).

  In decode mode the layer keeps a 'cache' collection (see `_Cache`): the conv
  window, the SSM state and the last segment id. Each call continues from it,
  however many tokens it brings (a whole prompt is one parallel pass).

  Attributes:
    embed_dim: e.
    inner_dim: i (expand·e).
    state_size: N.
    time_step_rank: R, the width of the dt projection.
    conv_kernel: w.
    use_bias: biases on the in and out projections.
    use_conv_bias: a bias on the convolution.
    chunk_size: tokens per parallel scan (computation only).
    dtype: computation dtype.
    param_dtype: parameter storage dtype.
  """
  embed_dim: int
  inner_dim: int
  state_size: int
  time_step_rank: int
  conv_kernel: int = 4
  use_bias: bool = False
  use_conv_bias: bool = True
  chunk_size: int = 32
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
    i, n, r = self.inner_dim, self.state_size, self.time_step_rank
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bias_axes = lambda axes: axes if self.use_bias else None  # noqa: E731
    inner_in = lambda name: Einsum((e, i), ("embed", "mlp"), "bte,ei->bti",  # noqa: E731
                                   bias_axes=bias_axes(("mlp",)), name=name, **kw)(x)
    xs, z = inner_in("in_x"), inner_in("in_z")

    cache = self._cache_variables(b) if decode else None
    previous = cache.segment_ids.value if cache is not None else None
    doc = document_index(segment_ids, (b, t), previous)
    xs, window = CausalConv(self.conv_kernel, ("mlp",), use_bias=self.use_conv_bias,
                            name="conv", **kw)(xs, doc, None if cache is None
                                               else cache.conv.value)
    xs = nn.with_logical_constraint(nn.silu(xs), _INNER_AXES)

    selective = lambda name, width, axis: Einsum(  # noqa: E731
        (i, width), ("mlp", axis), "bti,in->btn", name=name, **kw)(xs)
    dt = TimeStepProjection(i, name="dt_proj", **kw)(selective("x_dt", r, "low_rank"))
    bmat, cmat = selective("x_b", n, "ssm_state"), selective("x_c", n, "ssm_state")
    a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init, ("mlp", "ssm_state")),
                       (i, n), self.param_dtype)
    d_skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
                        (i,), self.param_dtype)
    a = -jnp.exp(a_log.astype(jnp.float32))

    y, state = selective_scan(xs, dt, a, bmat, cmat, d_skip, chunk_size=self.chunk_size,
                              segment_ids=segment_ids,
                              initial_state=None if cache is None else cache.state.value,
                              initial_segment_ids=previous)
    y = checkpoint_name(nn.with_logical_constraint(y, _INNER_AXES), "selective_scan")
    if cache is not None:
      cache.conv.value, cache.state.value = window, state
      if segment_ids is not None:
        cache.segment_ids.value = segment_ids[:, -1].astype(jnp.int32)

    y = (y.astype(jnp.float32) * nn.silu(z.astype(jnp.float32))).astype(self.dtype)
    return Einsum((i, e), ("mlp", "embed"), "bti,ie->bte", bias_axes=bias_axes(("embed",)),
                  name="out", **kw)(y)

  def _cache_variables(self, b: int) -> _Cache:
    """The cache variables, created as zeros if absent."""
    i, n, w = self.inner_dim, self.state_size, self.conv_kernel
    zeros = lambda axes: nn.with_logical_partitioning(jnp.zeros, axes)  # noqa: E731
    var = lambda name, axes, shape, dtype: self.variable(  # noqa: E731
        "cache", name, zeros(axes), shape, dtype)
    return _Cache(
        conv=var("conv_window", ("batch", "conv_width", "mlp"), (b, w - 1, i), self.dtype),
        state=var("ssm_state", ("batch", "mlp", "ssm_state"), (b, i, n), jnp.float32),
        segment_ids=var("segment_ids", ("batch",), (b,), jnp.int32))

