"""RWKV-7 ("Goose") sequence mixers.

  wkv7.py         `wkv7`: the generalized-delta-rule recurrence (sequential lax.scan, float32 state)
  token_shift.py  `token_shift`: the previous token of each token's document
  time_mix.py     `TimeMix`: the RWKV-7 attention replacement (lerps, low-rank decay/iclr/gate,
                  value residual, WKV-7, per-head GroupNorm, bonus)
  channel_mix.py  `ChannelMix`: token shift + squared-ReLU feed-forward
"""

from layers.rwkv.channel_mix import ChannelMix
from layers.rwkv.time_mix import TimeMix, group_norm_heads
from layers.rwkv.token_shift import token_shift
from layers.rwkv.wkv7 import wkv7
