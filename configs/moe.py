"""Mixture-of-Experts decoders (family 'moe') at real shapes, for GPU/TPU runs.

python -m train.main --config=configs/moe.py:size=mixtral_8x7b --workdir=gs://.../run
Sizes: `tiny` (= configs/moe_tiny.py), `mixtral_8x7b` (Mixtral 8x7B),
`qwen2_moe_a2.7b` (Qwen1.5-MoE-A2.7B: 60 fine-grained experts plus a gated
shared expert), `deepseek_v3_small` (DeepSeek-V3's routing - sigmoid scores,
group-limited top-k, scaled gates, aux-loss-free balance bias, shared
experts, first layer dense - on a 16-layer GQA model of DeepSeek-V2-Lite's
width; Treadle has no multi-head latent attention).
Train with `mesh.expert` > 1 to spread the experts over devices.
"""

from configs import base
from configs import common

_FIELDS = ("embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
           "vocab_size", "rope_theta", "norm_eps", "tie_embeddings", "qkv_bias", "num_experts",
           "num_experts_per_token", "expert_mlp_dim", "shared_expert_mlp_dim",
           "shared_expert_gate", "router", "router_norm_topk", "router_num_groups",
           "router_topk_groups", "routed_scaling_factor", "first_dense_layers")

SIZES = {
    "mixtral_8x7b": (4096, 32, 32, 8, 128, 14_336, 32_000, 1e6, 1e-5, False, False,
                     8, 2, 14_336, 0, False, "softmax", True, 1, 1, 1.0, 0),
    "qwen2_moe_a2.7b": (2048, 24, 16, 16, 128, 5632, 151_936, 1e6, 1e-6, False, True,
                        60, 4, 1408, 5632, True, "softmax", False, 1, 1, 1.0, 0),
    "deepseek_v3_small": (2048, 16, 16, 4, 128, 10_944, 102_400, 1e4, 1e-6, False, False,
                          64, 6, 1408, 2816, False, "sigmoid", True, 8, 4, 2.5, 1),
}


def get_config(arg=None):
  args = common.parse_arg(arg, size="tiny", seq_len=4096, batch=256)
  if args.size != "tiny" and args.size not in SIZES:
    raise ValueError(f"Unknown moe size {args.size!r}; choose one of "
                     f"{['tiny'] + sorted(SIZES)}.")
  config = base.get_base_config()
  m = config.model
  m.family = "moe"
  if args.size == "tiny":
    m.scan_layers = False  # Four layers run faster unrolled on CPU (see llama_tiny).
    config.lock()
    return config
  for field, value in zip(_FIELDS, SIZES[args.size]):
    m[field] = value
  common.set_pretraining_run(config, seq_len=args.seq_len, batch=args.batch)
  if m.router == "sigmoid":  # DeepSeek-V3 balancing: bias updates + a small sequence loss.
    config.opt.moe_aux_loss = 0.0
    config.opt.moe_seq_aux_loss = 1e-4
    config.opt.moe_bias_update_rate = 1e-3
  config.lock()
  return config
