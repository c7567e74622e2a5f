"""The dense decoders researchers download, at their released shapes: Qwen2.5, Qwen3,
Mistral 7B and Gemma 3 (text). All are settings of the 'llama' family's LlamaConfig.

python -m train.main --config=configs/dense_zoo.py:size=qwen3_0.6b --workdir=gs://.../run

Sizes: qwen2.5_{0.5b,1.5b,3b,7b} (q/k/v biases; tied embeddings up to 3B),
qwen3_{0.6b,1.7b,4b,8b} (q/k norms; tied up to 4B), mistral_7b (v0.1: a
4096-token sliding window), mistral_7b_v0.3 (no window), gemma3_{1b,4b} (text
only: GeGLU, (1 + w) norms, pre- and post-norms, scaled embeddings, q/k norms,
five 512/1024-token local layers per global one, each kind with its own RoPE
base; the 4B stretches the global RoPE 8x). Llama 3.x sizes are in
configs/llama.py.

These are the released models' shapes, for fine-tuning one imported with
`python -m train.convert import --model=qwen2|qwen3|mistral|gemma3` (the import
carries the shapes itself; this file is for training such a model afresh or
checking its size). The tokenizer is the downloaded model's tokenizer.json
(or SentencePiece tokenizer.model): `--config.data.tokenizer=MODEL_DIR`.
"""

from configs import base
from configs import common
from models.llama import LlamaConfig

_QWEN = dict(rope_theta=1e6, norm_eps=1e-6, vocab_size=151_936, head_dim=128)
_QWEN3 = dict(_QWEN, qk_norm=True)
_GEMMA3 = dict(head_dim=256, norm_eps=1e-6, rope_theta=1e6, local_rope_theta=1e4,
               global_every=6, query_pre_attn_scalar=256.0, qk_norm=True, norm_plus_one=True,
               post_norms=True, mlp_activation="gelu_tanh", embed_scale=True,
               tie_embeddings=True, scan_layers=False)
SIZES = {
    "qwen2.5_0.5b": dict(_QWEN, embed_dim=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         head_dim=64, mlp_dim=4864, qkv_bias=True, tie_embeddings=True),
    "qwen2.5_1.5b": dict(_QWEN, embed_dim=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                         mlp_dim=8960, qkv_bias=True, tie_embeddings=True),
    "qwen2.5_3b": dict(_QWEN, embed_dim=2048, num_layers=36, num_heads=16, num_kv_heads=2,
                       mlp_dim=11_008, qkv_bias=True, tie_embeddings=True),
    "qwen2.5_7b": dict(_QWEN, embed_dim=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                       mlp_dim=18_944, qkv_bias=True, vocab_size=152_064),
    "qwen3_0.6b": dict(_QWEN3, embed_dim=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                       mlp_dim=3072, tie_embeddings=True),
    "qwen3_1.7b": dict(_QWEN3, embed_dim=2048, num_layers=28, num_heads=16, num_kv_heads=8,
                       mlp_dim=6144, tie_embeddings=True),
    "qwen3_4b": dict(_QWEN3, embed_dim=2560, num_layers=36, num_heads=32, num_kv_heads=8,
                     mlp_dim=9728, tie_embeddings=True),
    "qwen3_8b": dict(_QWEN3, embed_dim=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                     mlp_dim=12_288),
    "mistral_7b": dict(embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       head_dim=128, mlp_dim=14_336, vocab_size=32_000, rope_theta=1e4,
                       norm_eps=1e-5, sliding_window=4096),
    "mistral_7b_v0.3": dict(embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                            head_dim=128, mlp_dim=14_336, vocab_size=32_768, rope_theta=1e6,
                            norm_eps=1e-5),
    "gemma3_1b": dict(_GEMMA3, embed_dim=1152, num_layers=26, num_heads=4, num_kv_heads=1,
                      mlp_dim=6912, vocab_size=262_144, sliding_window=512),
    "gemma3_4b": dict(_GEMMA3, embed_dim=2560, num_layers=34, num_heads=8, num_kv_heads=4,
                      mlp_dim=10_240, vocab_size=262_208, sliding_window=1024,
                      rope_scaling=dict(kind="linear", factor=8.0)),
}


def get_config(arg=None):
  args = common.parse_arg(arg, size="qwen3_0.6b", seq_len=4096, batch=256)
  if args.size not in SIZES:
    raise ValueError(f"Unknown dense_zoo size {args.size!r}; choose one of {sorted(SIZES)}.")
  model = LlamaConfig.from_dict({**SIZES[args.size], "max_seq_len": args.seq_len})
  config = base.get_base_config(model)
  common.set_pretraining_run(config, seq_len=args.seq_len, batch=args.batch)
  config.lock()
  return config
