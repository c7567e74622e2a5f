"""Mamba-2 language models at real sizes, for GPU/TPU runs.

python -m train.main --config=configs/mamba.py:size=130m --workdir=gs://.../run
Sizes follow the published mamba2-130m ... 2.7b shapes (expand 2, head dim 64,
state 128, one B/C group, GPT-NeoX vocabulary padded to 50,288, tied
embeddings); `size=tiny` is MambaConfig's defaults (the model of mamba_tiny, scanned).
"""

from configs import base
from configs import common
from models.mamba import MambaConfig

_MAMBA2 = dict(head_dim=64, state_size=128, num_groups=1, chunk_size=256, vocab_size=50_288,
               tie_embeddings=True)
SIZES = {
    "tiny": dict(),
    "130m": dict(embed_dim=768, num_layers=24, num_heads=24, **_MAMBA2),
    "370m": dict(embed_dim=1024, num_layers=48, num_heads=32, **_MAMBA2),
    "780m": dict(embed_dim=1536, num_layers=48, num_heads=48, **_MAMBA2),
    "1.3b": dict(embed_dim=2048, num_layers=48, num_heads=64, **_MAMBA2),
    "2.7b": dict(embed_dim=2560, num_layers=64, num_heads=80, **_MAMBA2),
}


def get_config(arg=None):
  args = common.parse_arg(arg, size="130m", seq_len=2048, batch=256)
  if args.size not in SIZES:
    raise ValueError(f"Unknown mamba size {args.size!r}; choose one of {sorted(SIZES)}.")
  if args.size == "tiny":
    config = base.get_base_config(MambaConfig(**SIZES["tiny"]))
  else:
    config = base.get_base_config(MambaConfig(**SIZES[args.size], max_seq_len=args.seq_len))
    common.set_pretraining_run(config, seq_len=args.seq_len, batch=args.batch)
  config.lock()
  return config
