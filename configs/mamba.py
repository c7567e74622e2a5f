"""Mamba-1 and Mamba-2 language models at real sizes, for GPU/TPU runs.

python -m train.main --config=configs/mamba.py:size=130m,version=1 --workdir=gs://.../run
Both versions come in the published widths and depths (130m: 768 x 24 layers,
370m: 1024 x 48, 780m: 1536 x 48, 1.3b: 2048 x 48, 2.7b: 2560 x 64; tied embeddings).
Version 2 (default) follows mamba2-130m ... 2.7b: expand 2, head dim 64, state 128,
one B/C group, GPT-NeoX vocabulary padded to 50,288. Version 1 follows
state-spaces/mamba-130m-hf ... mamba-2.8b-hf: expand 2, state 16 per channel,
conv 4, dt rank ceil(e/16), no projection biases, vocabulary padded to 50,280; its
own size names 790m, 1.4b and 2.8b are accepted for the 780m, 1.3b and 2.7b rows.
`size=tiny` is MambaConfig's defaults (the model of mamba_tiny, scanned) of either version.
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
_MAMBA1 = dict(version=1, state_size=16, expand=2, conv_kernel=4, time_step_rank="auto",
               use_bias=False, use_conv_bias=True, chunk_size=64, vocab_size=50_280,
               tie_embeddings=True)
# Mamba-1's release names for the sizes Mamba-2 calls 780m, 1.3b and 2.7b.
MAMBA1_NAMES = {"790m": "780m", "1.4b": "1.3b", "2.8b": "2.7b"}


def model_fields(size: str, version: int) -> dict:
  """The MambaConfig fields of a published size of `version` (1 or 2)."""
  if version not in (1, 2):
    raise ValueError(f"Unknown mamba version {version!r}; choose 1 or 2.")
  size = MAMBA1_NAMES.get(size, size) if version == 1 else size
  if size not in SIZES:
    names = sorted(SIZES) + (sorted(MAMBA1_NAMES) if version == 1 else [])
    raise ValueError(f"Unknown mamba size {size!r}; choose one of {names}.")
  if version == 2:
    return dict(SIZES[size])
  if size == "tiny":
    return dict(version=1)
  return dict(embed_dim=SIZES[size]["embed_dim"], num_layers=SIZES[size]["num_layers"],
              **_MAMBA1)


def get_config(arg=None):
  args = common.parse_arg(arg, size="130m", version=2, seq_len=2048, batch=256)
  fields = model_fields(args.size, args.version)
  if args.size == "tiny":
    config = base.get_base_config(MambaConfig(**fields))
  else:
    config = base.get_base_config(MambaConfig(**fields, max_seq_len=args.seq_len))
    common.set_pretraining_run(config, seq_len=args.seq_len, batch=args.batch)
  config.lock()
  return config
