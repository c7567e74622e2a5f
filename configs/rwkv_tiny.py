"""A tiny RWKV-7 (~1.1M parameters) on the embedded corpus, CPU-friendly.

python -m train.main --config=configs/rwkv_tiny.py --workdir=/tmp/rwkv_tiny
"""

from configs import base
from models.rwkv import RwkvConfig


def get_config(arg=None):
  del arg  # Variants live in configs/rwkv.py; override fields with --config.x=y.
  # RwkvConfig's defaults are the tiny model; four layers run faster unrolled on CPU.
  config = base.get_base_config(RwkvConfig(scan_layers=False))
  config.lock()
  return config
