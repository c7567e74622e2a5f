"""Llama-shaped decoders at real sizes, for GPU/TPU runs.

python -m train.main --config=configs/llama.py:size=1b --workdir=gs://.../run
Sizes follow the published Llama 3.x shapes; `size=tiny` is LlamaConfig's
defaults (the model of llama_tiny, scanned). `3.2_1b`, `3.2_3b`, `3.1_8b` and
`3.1_70b` are the released models exactly, with their 'llama3' RoPE scaling
(8k-token pre-training context stretched 32x or 8x), for fine-tuning an import
(`python -m train.convert import --model=llama`). Their tokenizer is the
tokenizer.json of the downloaded model: --config.data.tokenizer=MODEL_DIR.
"""

from configs import base
from configs import common
from models.llama import LlamaConfig

_LLAMA3 = dict(rope_theta=500_000.0, norm_eps=1e-5)


def _llama3_scaling(factor: float) -> dict:
  return dict(rope_scaling=dict(kind="llama3", factor=factor, original_context=8192,
                                low_freq_factor=1.0, high_freq_factor=4.0))


SIZES = {
    "tiny": dict(norm_eps=1e-5),
    "150m": dict(embed_dim=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                 mlp_dim=2048, vocab_size=32_768, tie_embeddings=True, **_LLAMA3),
    "1b": dict(embed_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
               mlp_dim=8192, vocab_size=128_256, tie_embeddings=True, **_LLAMA3),
    "3b": dict(embed_dim=3072, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
               mlp_dim=8192, vocab_size=128_256, tie_embeddings=True, **_LLAMA3),
    "8b": dict(embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
               mlp_dim=14_336, vocab_size=128_256, **_LLAMA3),
    "70b": dict(embed_dim=8192, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                mlp_dim=28_672, vocab_size=128_256, **_LLAMA3),
}
SIZES.update({
    "3.2_1b": {**SIZES["1b"], **_llama3_scaling(32.0)},
    "3.2_3b": {**SIZES["3b"], **_llama3_scaling(32.0)},
    "3.1_8b": {**SIZES["8b"], **_llama3_scaling(8.0)},
    "3.1_70b": {**SIZES["70b"], **_llama3_scaling(8.0)},
})


def get_config(arg=None):
  args = common.parse_arg(arg, size="1b", seq_len=4096, batch=256)
  if args.size not in SIZES:
    raise ValueError(f"Unknown llama size {args.size!r}; choose one of {sorted(SIZES)}.")
  if args.size == "tiny":
    config = base.get_base_config(LlamaConfig(**SIZES["tiny"]))
  else:
    config = base.get_base_config(
        LlamaConfig.from_dict({**SIZES[args.size], "max_seq_len": args.seq_len}))
    common.set_pretraining_run(config, seq_len=args.seq_len, batch=args.batch)
  config.lock()
  return config
