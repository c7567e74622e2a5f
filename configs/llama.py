"""Llama-shaped decoders at real sizes, for GPU/TPU runs.

python -m train.main --config=configs/llama.py:size=1b --workdir=gs://.../run
Sizes follow the published Llama 3.x shapes; `size=tiny` matches llama_tiny.
"""

from configs import base
from configs import common

SIZES = {
    # embed, layers, heads, kv_heads, head_dim, mlp, vocab, theta, tied
    "tiny": (128, 4, 4, 2, 32, 384, 512, 10_000.0, False),
    "150m": (768, 12, 12, 4, 64, 2048, 32_768, 500_000.0, True),
    "1b": (2048, 16, 32, 8, 64, 8192, 128_256, 500_000.0, True),
    "3b": (3072, 28, 24, 8, 128, 8192, 128_256, 500_000.0, True),
    "8b": (4096, 32, 32, 8, 128, 14_336, 128_256, 500_000.0, False),
    "70b": (8192, 80, 64, 8, 128, 28_672, 128_256, 500_000.0, False),
}


def get_config(arg=None):
  args = common.parse_arg(arg, size="1b", seq_len=4096, batch=256)
  if args.size not in SIZES:
    raise ValueError(f"Unknown llama size {args.size!r}; choose one of {sorted(SIZES)}.")
  config = base.get_base_config()
  m = config.model
  (m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
   m.vocab_size, m.rope_theta, m.tie_embeddings) = SIZES[args.size]
  m.norm_eps = 1e-5
  if args.size != "tiny":
    common.set_pretraining_run(config, seq_len=args.seq_len, batch=args.batch)
  config.lock()
  return config
