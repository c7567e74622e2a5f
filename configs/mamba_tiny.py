"""A tiny Mamba-2 (~0.6M parameters) on the embedded corpus, CPU-friendly.

python -m train.main --config=configs/mamba_tiny.py --workdir=/tmp/mamba_tiny
"""

from configs import base
from models.mamba import MambaConfig


def get_config(arg=None):
  del arg  # Variants live in configs/mamba.py; override fields with --config.x=y.
  # MambaConfig's defaults are the tiny model; four layers run faster unrolled on CPU.
  config = base.get_base_config(MambaConfig(scan_layers=False))
  config.lock()
  return config
