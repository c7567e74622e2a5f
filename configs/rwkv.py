"""RWKV-7 "Goose" language models at the published sizes, for GPU/TPU runs.

python -m train.main --config=configs/rwkv.py:size=0.1b --workdir=gs://.../run
Sizes follow the released RWKV-7 World models (head size 64, channel-mix width
4·e, the RWKV world vocabulary of 65,536, low-rank widths from
models.rwkv.low_rank_sizes); `size=tiny` is RwkvConfig's defaults (the model of
rwkv_tiny, scanned). Training runs the chunked WKV-7 form (model.chunk_size 16):
the Pallas kernel on an H100/H200 or TPU (model.rwkv_impl='auto'), its jnp twin
elsewhere (layers/rwkv/wkv7.py).
Tokenize as the World models do with --config.data.tokenizer=rwkv_world (the
vocabulary file of an installed `rwkv` package) or
--config.data.tokenizer=PATH/rwkv_vocab_v20230424.txt (train/data/rwkv_world.py).
"""

from configs import base
from configs import common
from models.rwkv import RwkvConfig, low_rank_sizes

_SHAPES = {"0.1b": (12, 768), "0.4b": (24, 1024), "1.5b": (24, 2048), "2.9b": (32, 2560),
           "7.2b": (32, 4096)}
SIZES = {"tiny": dict()}
SIZES.update({
    size: dict(num_layers=layers, embed_dim=embed, head_size=64, hidden_dim=4 * embed,
               vocab_size=65_536, **low_rank_sizes(embed))
    for size, (layers, embed) in _SHAPES.items()})


def get_config(arg=None):
  args = common.parse_arg(arg, size="0.1b", seq_len=4096, batch=256)
  if args.size not in SIZES:
    raise ValueError(f"Unknown rwkv size {args.size!r}; choose one of {sorted(SIZES)}.")
  if args.size == "tiny":
    config = base.get_base_config(RwkvConfig(**SIZES["tiny"]))
  else:
    config = base.get_base_config(RwkvConfig(**SIZES[args.size], max_seq_len=args.seq_len))
    common.set_pretraining_run(config, seq_len=args.seq_len, batch=args.batch)
  config.lock()
  return config
