"""Mixture-of-Experts decoder: the Llama decoder with routed SwiGLU experts.

Mixtral (softmax top-k), Qwen2-MoE (fine-grained experts plus a sigmoid-gated
shared expert) and DeepSeek-V3 (sigmoid group-limited routing, first layers
dense, aux-loss-free balance bias) are all settings of `MoeConfig`.

Parameters are those of `models.llama.Llama` except that the MoE blocks hold
`moe/...` (see `layers.moe.MoeFeedForward`) instead of `mlp/...`. Blocks are
named layers_0 ... layers_{L-1} when unrolled; with scan_layers the first
`first_dense_layers` are stacked as `dense_layers` and the rest as
`moe_layers`. Besides 'params' the model has a 'balance' collection (each MoE
layer's selection bias [E]) and, when applied with mutable=['moe_stats'],
sows per-layer routing statistics.

Shapes: b batch, t sequence, e embed, E experts, L layers.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp

from layers.moe import MoeFeedForward
from models import llama

MOE_IMPLS = ("dropless", "capacity")
ROUTERS = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeConfig(llama.LlamaConfig):
  """The `config.model` fields of an MoE decoder: LlamaConfig's plus routing.

  Attributes:
    num_experts, num_experts_per_token, expert_mlp_dim, shared_expert_mlp_dim,
    shared_expert_gate, router, router_norm_topk, router_num_groups,
    router_topk_groups, routed_scaling_factor, first_dense_layers, moe_impl,
    capacity_factor: as documented in configs/base.py.
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
  first_dense_layers: int = 0
  moe_impl: str = "dropless"
  capacity_factor: float = 1.25

  def __post_init__(self):
    super().__post_init__()
    if not 0 <= self.first_dense_layers < self.num_layers:
      raise ValueError(f"model.first_dense_layers={self.first_dense_layers} must be in "
                       f"[0, model.num_layers={self.num_layers}): at least one layer is MoE.")
    # MoeFeedForward checks the routing fields (top-k, groups, capacity, the
    # shared expert) by their config names when the model is first traced.

  def feed_forward(self, name: str | None = None) -> MoeFeedForward:
    """The MoE layer these fields describe."""
    return MoeFeedForward(
        num_experts=self.num_experts, num_experts_per_token=self.num_experts_per_token,
        expert_mlp_dim=self.expert_mlp_dim, shared_expert_mlp_dim=self.shared_expert_mlp_dim,
        shared_expert_gate=self.shared_expert_gate, router=self.router,
        router_norm_topk=self.router_norm_topk, router_num_groups=self.router_num_groups,
        router_topk_groups=self.router_topk_groups,
        routed_scaling_factor=self.routed_scaling_factor, impl=self.moe_impl,
        capacity_factor=self.capacity_factor, dtype=jnp.dtype(self.dtype),
        param_dtype=jnp.dtype(self.param_dtype), name=name)

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers - self.first_dense_layers


class MoeBlock(llama.Block):
  """A Llama block whose feed-forward is `MoeFeedForward` (named 'moe').

  Padding tokens (segment id 0) are left out of the routing statistics.
  """

  def feed_forward(self, y, segment_ids):
    token_mask = None if segment_ids is None else segment_ids > 0
    return self.config.feed_forward(name="moe")(y, token_mask)


class Moe(llama.Llama):
  """Decoder-only MoE language model (see the module docstring).

  Attributes:
    config: MoeConfig.
  """
  config: MoeConfig

  def decoder_layers(self, x, positions, segment_ids, decode: bool):
    cfg = self.config
    if cfg.first_dense_layers:
      x = llama.stack_blocks(llama.Block, cfg, decode, x, positions, segment_ids,
                             count=cfg.first_dense_layers, first_index=0,
                             scan_name="dense_layers")
    return llama.stack_blocks(MoeBlock, cfg, decode, x, positions, segment_ids,
                              count=cfg.num_moe_layers, first_index=cfg.first_dense_layers,
                              scan_name="moe_layers")


# A zero KV cache (see `models.llama.init_cache`).
init_cache = functools.partial(llama.init_cache, model_class=Moe)


_LAYER_NAME = re.compile(r"layers_(\d+)$")


def _moe_layer_entries(collection: dict) -> list:
  """The per-MoE-layer subtrees of a collection, in layer order.

  Unrolled: [collection['layers_i']['moe'] for each MoE layer i]; scanned:
  [collection['moe_layers']['moe']] whose leaves carry a leading [L_moe] axis.
  """
  if "moe_layers" in collection:
    return [collection["moe_layers"]["moe"]]
  indexed = sorted((int(_LAYER_NAME.match(name).group(1)), sub)
                   for name, sub in collection.items()
                   if _LAYER_NAME.match(name) and "moe" in sub)
  return [sub["moe"] for _, sub in indexed]


def stack_moe_layers(collection: dict) -> dict[str, jax.Array]:
  """A per-layer collection ('moe_stats' or 'balance') as arrays [L_moe, ...] by name."""
  entries = _moe_layer_entries(collection)
  if not entries:
    raise ValueError("No MoE layers found in the collection (expected layers_<i>/moe or "
                     "moe_layers/moe).")
  if len(entries) == 1 and "moe_layers" in collection:
    return dict(entries[0])
  return {name: jnp.stack([entry[name] for entry in entries]) for name in entries[0]}


def unstack_moe_layers(collection: dict, stacked: dict[str, jax.Array]) -> dict:
  """Inverse of `stack_moe_layers`: writes [L_moe, ...] arrays back into the tree."""
  if "moe_layers" in collection:
    return {**collection, "moe_layers": {"moe": dict(stacked)}}
  out = dict(collection)
  moe_names = [name for name in collection
               if _LAYER_NAME.match(name) and "moe" in collection[name]]
  moe_names.sort(key=lambda name: int(_LAYER_NAME.match(name).group(1)))
  for row, name in enumerate(moe_names):
    out[name] = {**collection[name],
                 "moe": {key: value[row] for key, value in stacked.items()}}
  return out
