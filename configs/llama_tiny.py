"""The default run: a ~1M-parameter Llama on the embedded corpus, CPU-friendly.

python -m train.main --config=configs/llama_tiny.py --workdir=/tmp/tiny
"""

from configs import base


def get_config(arg=None):
  del arg  # The tiny config has no variants; override fields with --config.x=y.
  config = base.get_base_config()
  config.lock()
  return config
