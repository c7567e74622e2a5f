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
from models.moe import MoeConfig, MoeLayerConfig

# Each size: the decoder's fields, and its `moe` section.
SIZES = {
    "mixtral_8x7b": dict(
        embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        mlp_dim=14_336, vocab_size=32_000, rope_theta=1e6, norm_eps=1e-5,
        moe=MoeLayerConfig(num_experts=8, num_experts_per_token=2, expert_mlp_dim=14_336)),
    "qwen2_moe_a2.7b": dict(
        embed_dim=2048, num_layers=24, num_heads=16, num_kv_heads=16, head_dim=128,
        mlp_dim=5632, vocab_size=151_936, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
        moe=MoeLayerConfig(num_experts=60, num_experts_per_token=4, expert_mlp_dim=1408,
                           shared_expert_mlp_dim=5632, shared_expert_gate=True,
                           router_norm_topk=False)),
    "deepseek_v3_small": dict(
        embed_dim=2048, num_layers=16, num_heads=16, num_kv_heads=4, head_dim=128,
        mlp_dim=10_944, vocab_size=102_400, rope_theta=1e4, norm_eps=1e-6,
        # DeepSeek-V3 balancing: bias updates and a small sequence-wise loss, no Switch loss.
        moe=MoeLayerConfig(num_experts=64, num_experts_per_token=6, expert_mlp_dim=1408,
                           shared_expert_mlp_dim=2816, router="sigmoid", router_num_groups=8,
                           router_topk_groups=4, routed_scaling_factor=2.5,
                           first_dense_layers=1, aux_loss=0.0, seq_aux_loss=1e-4,
                           bias_update_rate=1e-3)),
}


def get_config(arg=None):
  args = common.parse_arg(arg, size="tiny", seq_len=4096, batch=256)
  if args.size != "tiny" and args.size not in SIZES:
    raise ValueError(f"Unknown moe size {args.size!r}; choose one of "
                     f"{['tiny'] + sorted(SIZES)}.")
  if args.size == "tiny":
    # MoeConfig's defaults: four layers of 8 experts, top-2, each expert half
    # the width of llama_tiny's MLP; unrolled, as llama_tiny.
    config = base.get_base_config(MoeConfig(scan_layers=False))
  else:
    config = base.get_base_config(MoeConfig(**SIZES[args.size], max_seq_len=args.seq_len))
    common.set_pretraining_run(config, seq_len=args.seq_len, batch=args.batch)
  config.lock()
  return config
