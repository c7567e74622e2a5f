"""Top-K token-to-expert routers: softmax (Mixtral, Qwen2-MoE) and sigmoid (DeepSeek-V3).

Shapes: see layers/__init__.py (here n, e, E, K, G).

Router logits are computed in float32 whatever the computation dtype. The
balance bias [E] (DeepSeek-V3's aux-loss-free `e_score_correction_bias`) is
added to the scores for *selection only*: it never reaches the gate weights
and gets no gradient.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

KINDS = ("softmax", "sigmoid")


class RouterOutput(NamedTuple):
  """What a router returns.

  Attributes:
    weights: [n, K] float32 gate weights of the chosen experts.
    indices: [n, K] int32 chosen experts, best first.
    probs: [n, E] float32 normalised scores for the balance losses (softmax
      probabilities, or sigmoid scores divided by their sum over experts).
    logits: [n, E] float32 raw router logits.
  """
  weights: jax.Array
  indices: jax.Array
  probs: jax.Array
  logits: jax.Array


def check_router_config(*, num_experts: int, num_experts_per_token: int, kind: str,
                        num_groups: int, topk_groups: int) -> None:
  """Raises ValueError naming the config field for an impossible routing setup."""
  if kind not in KINDS:
    raise ValueError(f"model.moe.router={kind!r}; choose one of {KINDS}.")
  if num_experts < 1:
    raise ValueError(f"model.moe.num_experts={num_experts} must be at least 1.")
  if not 1 <= num_experts_per_token <= num_experts:
    raise ValueError(f"model.moe.num_experts_per_token={num_experts_per_token} must be in "
                     f"[1, model.moe.num_experts={num_experts}].")
  if num_groups < 1 or num_experts % num_groups:
    raise ValueError(f"model.moe.router_num_groups={num_groups} must be a positive divisor of "
                     f"model.moe.num_experts={num_experts}.")
  if not 1 <= topk_groups <= num_groups:
    raise ValueError(f"model.moe.router_topk_groups={topk_groups} must be in "
                     f"[1, model.moe.router_num_groups={num_groups}].")
  if topk_groups * (num_experts // num_groups) < num_experts_per_token:
    raise ValueError(
        f"model.moe.router_topk_groups={topk_groups} keeps "
        f"{topk_groups * (num_experts // num_groups)} experts, fewer than model.moe.num_experts_per_token={num_experts_per_token}.")


def group_limited_mask(choice: jax.Array, num_groups: int, topk_groups: int) -> jax.Array:
  """Bool [n, E]: experts in the `topk_groups` best of `num_groups` equal groups.

  A group's score is the sum of its two largest `choice` values (DeepSeek-V3;
  a group of one expert scores its only value).
  """
  n, num_experts = choice.shape
  grouped = choice.reshape(n, num_groups, num_experts // num_groups)
  top = jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0]
  group_scores = top.sum(-1)  # [n, G]
  _, best = jax.lax.top_k(group_scores, topk_groups)
  keep = jnp.zeros((n, num_groups), bool).at[jnp.arange(n)[:, None], best].set(True)
  return jnp.repeat(keep, num_experts // num_groups, axis=1)


def route(logits: jax.Array, balance_bias: jax.Array | None, *, kind: str, k: int,
          norm_topk: bool, num_groups: int = 1, topk_groups: int = 1,
          routed_scaling_factor: float = 1.0) -> RouterOutput:
  """Chooses K = `k` experts per token from float32 `logits` [n, E].

  softmax: probs = softmax(logits); select top-K of probs + bias; weights =
    probs at the chosen experts, divided by their sum if `norm_topk`.
  sigmoid: scores = sigmoid(logits); select top-K of scores + bias; weights =
    scores at the chosen experts, divided by (their sum + 1e-20) if `norm_topk`.
  With num_groups > 1 the selection is group-limited (see group_limited_mask).
  Weights are finally multiplied by `routed_scaling_factor`.
  """
  logits = logits.astype(jnp.float32)
  if kind == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
    probs = scores
  elif kind == "sigmoid":
    scores = jax.nn.sigmoid(logits)
    probs = scores / scores.sum(-1, keepdims=True)
  else:
    raise ValueError(f"model.moe.router={kind!r}; choose one of {KINDS}.")
  choice = scores
  if balance_bias is not None:
    choice = choice + jax.lax.stop_gradient(balance_bias.astype(jnp.float32))
  choice = jax.lax.stop_gradient(choice)
  if num_groups > 1:
    keep = group_limited_mask(choice, num_groups, topk_groups)
    choice = jnp.where(keep, choice, -jnp.inf)
  _, indices = jax.lax.top_k(choice, k)
  weights = jnp.take_along_axis(scores, indices, axis=-1)
  if norm_topk:
    eps = 1e-20 if kind == "sigmoid" else 0.0
    weights = weights / (weights.sum(-1, keepdims=True) + eps)
  weights = weights * routed_scaling_factor
  return RouterOutput(weights, indices.astype(jnp.int32), probs, logits)


class Router(nn.Module):
  """Linear router (no bias) followed by `route`.

  Attributes:
    num_experts: E.
    num_experts_per_token: K.
    kind: 'softmax' or 'sigmoid'.
    norm_topk: renormalise the K chosen weights to sum to 1.
    num_groups: G expert groups for group-limited routing (1: off).
    topk_groups: groups kept per token.
    routed_scaling_factor: multiplies the final weights.
    dtype: unused for the logits (always float32); kept for the house interface.
    param_dtype: storage dtype of the kernel.
  """
  num_experts: int
  num_experts_per_token: int
  kind: str = "softmax"
  norm_topk: bool = True
  num_groups: int = 1
  topk_groups: int = 1
  routed_scaling_factor: float = 1.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, balance_bias: jax.Array | None = None) -> RouterOutput:
    """x [n, e], balance_bias [E] or None -> RouterOutput."""
    check_router_config(num_experts=self.num_experts, num_experts_per_token=self.num_experts_per_token,
                        kind=self.kind, num_groups=self.num_groups, topk_groups=self.topk_groups)
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    kernel = self.param("kernel", nn.with_logical_partitioning(init, ("embed", None)),
                        (x.shape[-1], self.num_experts), self.param_dtype)
    logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return route(logits, balance_bias, kind=self.kind, k=self.num_experts_per_token,
                 norm_topk=self.norm_topk, num_groups=self.num_groups, topk_groups=self.topk_groups,
                 routed_scaling_factor=self.routed_scaling_factor)
