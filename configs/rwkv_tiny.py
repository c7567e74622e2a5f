"""A tiny RWKV-7 (~1.1M parameters) on the embedded corpus, CPU-friendly.

python -m train.main --config=configs/rwkv_tiny.py --workdir=/tmp/rwkv_tiny
"""

from configs import base
from models.rwkv import RwkvConfig


def get_config(arg=None):
  del arg  # Variants live in configs/rwkv.py; override fields with --config.x=y.
  # RwkvConfig's defaults are the tiny model; four layers run faster unrolled on CPU,
  # and at this size XLA:CPU runs the sequential WKV scan about twice as fast as the
  # chunked form (chunk_size=16), which pays off on accelerators and long rows.
  config = base.get_base_config(RwkvConfig(scan_layers=False, chunk_size=0))
  config.lock()
  return config
