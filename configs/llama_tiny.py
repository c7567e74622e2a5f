"""The default run: a ~1M-parameter Llama on the embedded corpus, CPU-friendly.

python -m train.main --config=configs/llama_tiny.py --workdir=/tmp/tiny
"""

from configs import base
from models.llama import LlamaConfig


def get_config(arg=None):
  del arg  # The tiny config has no variants; override fields with --config.x=y.
  # LlamaConfig's defaults are the tiny model. Four layers: unrolled they run
  # ~30% faster on CPU than under nn.scan, whose compile-time savings only
  # matter for deep models.
  config = base.get_base_config(LlamaConfig(scan_layers=False))
  config.lock()
  return config
