"""`config.model` of the Mixture-of-Experts family ('moe'): the dense decoder's fields
plus the routed-expert section `model.moe`.

Mixtral (softmax top-K), Qwen2-MoE (fine-grained experts plus a sigmoid-gated
shared expert) and DeepSeek-V3 (sigmoid group-limited routing, first layers
dense, aux-loss-free balance bias) are all settings of `MoeConfig`; their
shapes are in configs/moe.py. Shapes: see layers/__init__.py.
"""

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from layers.moe import MoeFeedForward
from models.config_schema import ConfigSection, field, section
from models.llama.config import LlamaConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeLayerConfig(ConfigSection):
  """The routed experts that replace a block's MLP, their routing and balancing."""
  num_experts: int = field(8, "Routed experts per MoE layer (E).")
  num_experts_per_token: int = field(2, "Experts each token is sent to (K, top-k).")
  expert_mlp_dim: int = field(192, "SwiGLU hidden width of each routed expert (m).")
  shared_expert_mlp_dim: int = field(0, "Hidden width of the always-on shared expert; 0 = none.")
  shared_expert_gate: bool = field(False, "Scale the shared expert by a learned sigmoid gate "
                                   "(Qwen2-MoE).")
  router: str = field("softmax", "softmax (Mixtral, Qwen2-MoE) | sigmoid (DeepSeek-V3).")
  router_norm_topk: bool = field(True, "Renormalise the top-k gate weights to sum to 1.")
  router_num_groups: int = field(1, "DeepSeek group-limited routing: expert groups (G; 1 = off).")
  router_topk_groups: int = field(1, "Groups each token may pick experts from.")
  routed_scaling_factor: float = field(1.0, "Multiplies the routed experts' gate weights.")
  first_dense_layers: int = field(0, "The first this many layers use a dense SwiGLU of "
                                  "model.mlp_dim.")
  impl: str = field("dropless", "dropless (sorted grouped matmul) | capacity (fixed buffers, "
                    "drops).", shapes_params=False)
  capacity_factor: float = field(1.25, "capacity impl: slots per expert and row = factor * "
                                 "seq_len * K / E.", shapes_params=False)
  aux_loss: float = field(0.01, "Switch load-balancing loss weight (1.0 at even load).",
                          shapes_params=False)
  seq_aux_loss: float = field(0.0, "DeepSeek-V3 sequence-wise balance loss weight (~1e-4); "
                              "0 disables.", shapes_params=False)
  router_z_loss: float = field(1e-3, "Weight of the router's log-partition squared; 0 "
                               "disables.", shapes_params=False)
  bias_update_rate: float = field(0.0, "DeepSeek-V3 aux-loss-free balancing: after each step "
                                  "b += rate * sign(mean_load - load); 0 disables.",
                                  shapes_params=False)

  def __post_init__(self):
    self.layer().check()

  def layer(self, dtype: str = "float32", param_dtype: str = "float32",
            name: str | None = None) -> MoeFeedForward:
    """The MoE layer these fields describe."""
    return MoeFeedForward(
        num_experts=self.num_experts, num_experts_per_token=self.num_experts_per_token,
        expert_mlp_dim=self.expert_mlp_dim, shared_expert_mlp_dim=self.shared_expert_mlp_dim,
        shared_expert_gate=self.shared_expert_gate, router=self.router,
        router_norm_topk=self.router_norm_topk, router_num_groups=self.router_num_groups,
        router_topk_groups=self.router_topk_groups,
        routed_scaling_factor=self.routed_scaling_factor, impl=self.impl,
        capacity_factor=self.capacity_factor, dtype=jnp.dtype(dtype),
        param_dtype=jnp.dtype(param_dtype), name=name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeConfig(LlamaConfig):
  """A Llama decoder whose MLPs (after `moe.first_dense_layers`) are routed experts."""
  family: ClassVar[str] = "moe"

  moe: MoeLayerConfig = section(MoeLayerConfig, "The routed experts.")

  def __post_init__(self):
    super().__post_init__()
    if not 0 <= self.moe.first_dense_layers < self.num_layers:
      raise ValueError(f"model.moe.first_dense_layers={self.moe.first_dense_layers} must be in "
                       f"[0, model.num_layers={self.num_layers}): at least one layer is MoE.")

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers - self.moe.first_dense_layers

  def sharded_sizes(self):
    return {**super().sharded_sizes(), "moe.num_experts": ("expert", self.moe.num_experts)}

  def matmul_params(self) -> int:
    """Weights each token multiplies with: attention, the router, its top-K routed
    experts and the shared expert (dense MLPs in the first `moe.first_dense_layers`),
    and the output projection."""
    m, e = self.moe, self.embed_dim
    dense_mlp = 3 * e * self.mlp_dim
    moe_mlp = (e * m.num_experts  # router
               + 3 * e * m.expert_mlp_dim * m.num_experts_per_token
               + 3 * e * m.shared_expert_mlp_dim
               + (e if m.shared_expert_gate else 0))
    return (self.num_layers * self.attention_matmul_params()
            + m.first_dense_layers * dense_mlp + self.num_moe_layers * moe_mlp
            + e * self.vocab_size)
