"""The default MoE run: a tiny Mixtral-style decoder on the embedded corpus, CPU-friendly.

python -m train.main --config=configs/moe_tiny.py --workdir=/tmp/moe_tiny
Four layers of 8 experts, top-2, each expert half the width of llama_tiny's MLP
(so a token's active MLP width matches it). Balance with the auxiliary loss
(`opt.moe_aux_loss`) or DeepSeek's bias (`--config.opt.moe_bias_update_rate=1e-3`).
"""

from configs import moe


def get_config(arg=None):
  del arg  # Variants live in configs/moe.py; override fields with --config.x=y.
  return moe.get_config("size=tiny")
