"""Mixture-of-Experts feed-forward layer (Mixtral, Qwen2-MoE and DeepSeek-V3 styles).

Shapes: see layers/__init__.py (here b, t, e, m, E, K).

Parameter tree (HF converters depend on these names):
  router/kernel [e, E] ('embed', None)
  experts/gate [E, e, m], experts/up [E, e, m] ('expert', 'embed', 'mlp')
  experts/down [E, m, e] ('expert', 'mlp', 'embed')
  shared/{gate,up,down}/kernel   a SwiGLU, when shared_expert_mlp_dim > 0
  shared_gate/kernel [e, 1] ('embed', None), when shared_expert_gate
Other collections:
  balance/bias [E] float32, zeros at init: aux-loss-free selection bias,
    updated outside the gradient (b += gamma * sign(mean(load) - load)).
  moe_stats (sown, one value per layer): expert_tokens [E], num_tokens [],
    dropped [], load_balance_loss [], seq_balance_loss [], router_z_loss [];
    all float32, computed over real tokens only (see moe_stats).
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from layers.linear import Einsum
from layers.mlp import SwiGLU
from layers.moe import expert_parallel
from layers.moe.router import Router, RouterOutput, check_router_config

STAT_NAMES = ("expert_tokens", "num_tokens", "dropped", "load_balance_loss",
              "seq_balance_loss", "router_z_loss")


def _expert_init(in_axis: int, out_axis: int) -> Callable:
  """Fan-in truncated normal per expert (like Einsum), axis 0 indexing experts."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=(0,))


class Experts(nn.Module):
  """The stacked expert weights gate/up [E, e, m] and down [E, m, e].

  Attributes:
    num_experts: E.
    embed_dim: e.
    mlp_dim: m.
    param_dtype: storage dtype.
  """
  num_experts: int
  embed_dim: int
  mlp_dim: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (gate, up, down)."""
    shape_in = (self.num_experts, self.embed_dim, self.mlp_dim)
    shape_out = (self.num_experts, self.mlp_dim, self.embed_dim)
    axes_in, axes_out = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
    gate = self.param("gate", nn.with_logical_partitioning(_expert_init(1, 2), axes_in),
                      shape_in, self.param_dtype)
    up = self.param("up", nn.with_logical_partitioning(_expert_init(1, 2), axes_in),
                    shape_in, self.param_dtype)
    down = self.param("down", nn.with_logical_partitioning(_expert_init(1, 2), axes_out),
                      shape_out, self.param_dtype)
    return gate, up, down


def moe_stats(route: RouterOutput, token_mask: jax.Array, num_experts: int) -> dict[str, jax.Array]:
  """Load statistics and balance losses over real tokens.

  route fields are [b, t, ...]; token_mask [b, t] bool. With f_i the fraction
  of the K * n real assignments sent to expert i and P_i the mean normalised
  score of expert i over real tokens:
    load_balance_loss = E * sum_i f_i * P_i (Switch). Perfectly uniform
      routing gives 1.0. HF Mixtral's load_balancing_loss_func (one layer)
      counts f_i per token instead of per assignment, so it equals K times
      this value: an HF coefficient alpha corresponds to alpha * K here.
    seq_balance_loss (DeepSeek-V3, per row with n_row real tokens):
      f_i = E / (K n_row) * sum_t 1[t picks i], P_i = mean_t probs; sum_i f_i P_i,
      averaged over rows with real tokens (uniform routing gives 1.0).
    router_z_loss = mean over real tokens of logsumexp(logits)^2.
  Gradients flow through P (the probs) and the logits; counts are constants.
  """
  b, t, top_k = route.indices.shape
  mask = token_mask.astype(jnp.float32)
  picks = jnp.sum(jax.nn.one_hot(route.indices, num_experts, dtype=jnp.float32), axis=2)  # [b,t,E]
  picks = picks * mask[..., None]
  row_tokens = mask.sum(1)  # [b]
  num_tokens = row_tokens.sum()
  expert_tokens = picks.sum((0, 1))
  denom = jnp.maximum(num_tokens, 1.0)
  f = expert_tokens / (top_k * denom)
  p = jnp.sum(route.probs * mask[..., None], axis=(0, 1)) / denom
  load_balance_loss = num_experts * jnp.sum(f * p)
  row_denom = jnp.maximum(row_tokens, 1.0)[:, None]
  f_row = picks.sum(1) * num_experts / (top_k * row_denom)
  p_row = jnp.sum(route.probs * mask[..., None], axis=1) / row_denom
  has_tokens = (row_tokens > 0).astype(jnp.float32)
  seq_loss = jnp.sum(jnp.sum(f_row * p_row, -1) * has_tokens) / jnp.maximum(has_tokens.sum(), 1.0)
  z = jax.nn.logsumexp(route.logits, axis=-1)
  z_loss = jnp.sum(z ** 2 * mask) / denom
  return dict(expert_tokens=expert_tokens, num_tokens=num_tokens,
              load_balance_loss=load_balance_loss, seq_balance_loss=seq_loss, router_z_loss=z_loss)


class MoeFeedForward(nn.Module):
  """Top-K routed SwiGLU experts plus an optional always-on shared expert.

  Attributes:
    num_experts: E routed experts.
    num_experts_per_token: K experts per token.
    expert_mlp_dim: m, hidden width of each routed expert.
    shared_expert_mlp_dim: total hidden width of the shared SwiGLU expert (0: none).
    shared_expert_gate: multiply the shared expert's output by sigmoid(x @ shared_gate) (Qwen2-MoE).
    router: 'softmax' (Mixtral, Qwen2-MoE) or 'sigmoid' (DeepSeek-V3).
    router_norm_topk: renormalise the K weights to sum to 1.
    router_num_groups: G expert groups for group-limited routing (1: off).
    router_topk_groups: groups kept per token.
    routed_scaling_factor: multiplies the routed weights (DeepSeek-V3 2.5).
    impl: 'dropless' (sort + grouped matmul) or 'capacity' (fixed buffers, drops overflow).
    capacity_factor: slots per expert = ceil(factor * t * K / E) per sequence ('capacity' only).
    dtype: computation dtype (the router always computes in float32).
    param_dtype: parameter storage dtype.
  """
  num_experts: int
  num_experts_per_token: int
  expert_mlp_dim: int
  shared_expert_mlp_dim: int = 0
  shared_expert_gate: bool = False
  router: str = "softmax"
  router_norm_topk: bool = True
  router_num_groups: int = 1
  router_topk_groups: int = 1
  routed_scaling_factor: float = 1.0
  impl: str = "dropless"
  capacity_factor: float = 1.25
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def check(self) -> None:
    """Raises ValueError naming the config field (`model.moe.*`) of an impossible setup."""
    check_router_config(num_experts=self.num_experts, num_experts_per_token=self.num_experts_per_token,
                        kind=self.router, num_groups=self.router_num_groups,
                        topk_groups=self.router_topk_groups)
    if self.impl not in expert_parallel.IMPLS:
      raise ValueError(f"model.moe.impl={self.impl!r}; choose one of {expert_parallel.IMPLS}.")
    if self.impl == "capacity" and not self.capacity_factor > 0:
      raise ValueError(f"model.moe.capacity_factor={self.capacity_factor} must be > 0.")
    if self.shared_expert_gate and self.shared_expert_mlp_dim < 1:
      raise ValueError("model.moe.shared_expert_gate=True needs "
                       "model.moe.shared_expert_mlp_dim > 0.")
    if self.expert_mlp_dim < 1:
      raise ValueError(f"model.moe.expert_mlp_dim={self.expert_mlp_dim} must be at least 1.")

  @nn.compact
  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """x [b, t, e], token_mask [b, t] bool (True = real token) or None -> [b, t, e]."""
    self.check()
    b, t, e = x.shape
    num_experts, top_k = self.num_experts, self.num_experts_per_token
    mask = jnp.ones((b, t), bool) if token_mask is None else token_mask.astype(bool)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    bias = self.variable("balance", "bias", jnp.zeros, (num_experts,), jnp.float32)

    route = Router(num_experts, top_k, kind=self.router, norm_topk=self.router_norm_topk,
                   num_groups=self.router_num_groups, topk_groups=self.router_topk_groups,
                   routed_scaling_factor=self.routed_scaling_factor, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="router")(x.reshape(b * t, e), bias.value)
    route = RouterOutput(*(a.reshape(b, t, -1) for a in route))

    gate, up, down = Experts(num_experts, e, self.expert_mlp_dim, self.param_dtype,
                             name="experts")()
    xc, gate, up, down = promote_dtype(x, gate, up, down, dtype=self.dtype)
    y, dropped = expert_parallel.moe_experts(
        xc, route.weights, route.indices, gate, up, down, impl=self.impl,
        capacity_factor=self.capacity_factor, token_mask=mask)

    if self.shared_expert_mlp_dim > 0:
      shared = SwiGLU(self.shared_expert_mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="shared")(x)
      if self.shared_expert_gate:
        g = Einsum((e, 1), ("embed", None), "bte,eo->bto", dtype=self.dtype,
                   param_dtype=self.param_dtype, name="shared_gate")(x)
        shared = jax.nn.sigmoid(g) * shared
      y = y + shared.astype(y.dtype)

    stats = moe_stats(route, mask, num_experts)
    stats["dropped"] = dropped.astype(jnp.float32)
    for name in STAT_NAMES:
      self.sow("moe_stats", name, stats[name], init_fn=lambda: 0, reduce_fn=lambda _, v: v)
    return nn.with_logical_constraint(y.astype(self.dtype), ("batch", "length", "act_embed"))
