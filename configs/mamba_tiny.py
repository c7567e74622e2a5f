"""A tiny Mamba-2 (~0.6M parameters) on the embedded corpus, CPU-friendly.

python -m train.main --config=configs/mamba_tiny.py --workdir=/tmp/mamba_tiny

`:hybrid` makes it a Jamba-style hybrid: the block at depth 2 of 4 is a Llama
decoder block (attention + MLP, `model.attention.*`) instead of a Mamba mixer:

python -m train.main --config=configs/mamba_tiny.py:hybrid --workdir=/tmp/mamba_hybrid

Other depths: --config.model.attention_layers='(1,3)'.
"""

from configs import base
from configs import common
from models.mamba import MambaConfig


def get_config(arg=None):
  args = common.parse_arg(arg, hybrid=False)
  # MambaConfig's defaults are the tiny model; four layers run faster unrolled on CPU.
  model = MambaConfig(scan_layers=False, attention_layers=(2,) if args.hybrid else ())
  config = base.get_base_config(model)
  config.lock()
  return config
