"""The Mixture-of-Experts feed-forward layer and its parts.

  layer.py             `MoeFeedForward` (router + routed experts + optional shared
                       expert), the expert weights and the routing statistics.
  router.py            top-k token-to-expert routers (softmax, sigmoid, group-limited).
  expert_parallel.py   routed experts with or without a device mesh ('dropless' |
                       'capacity'; all-to-all over the expert axis).
  dispatch.py          single-shard expert computation: sort + grouped matmul
                       (dropless) and fixed per-expert buffers (capacity).
  grouped_matmul.py    the experts' SwiGLU over rows sorted by expert.

Shapes: see layers/__init__.py.
"""

from layers.moe.expert_parallel import moe_experts
from layers.moe.layer import STAT_NAMES, Experts, MoeFeedForward, moe_stats
from layers.moe.router import Router, RouterOutput, check_router_config, route

__all__ = [
    "STAT_NAMES", "Experts", "MoeFeedForward", "Router", "RouterOutput",
    "check_router_config", "moe_experts", "moe_stats", "route",
]
