"""RWKV-7 ("Goose") sequence mixers.

  wkv7.py         `wkv7_chunked` (the training form: matrix form per chunk, scan between
                  chunks) and `wkv7` (sequential lax.scan: decode steps, and the reference),
                  re-exported from pallas_kernels/wkv7/reference.py; the 'xla' | 'pallas' |
                  'auto' switch (`resolve_impl`, `wkv7_apply`) over them and the kernel
  token_shift.py  `token_shift`: the previous token of each token's document
  time_mix.py     `TimeMix`: the RWKV-7 attention replacement (lerps, low-rank decay/iclr/gate,
                  value residual, WKV-7, per-head GroupNorm, bonus)
  channel_mix.py  `ChannelMix`: token shift + squared-ReLU feed-forward
  initializers.py RWKV-LM's depth-dependent initial values (lerps, decay offsets, ln_x
                  scale, orthogonal/zero projections) as Flax initializers
"""

from layers.rwkv.channel_mix import ChannelMix
from layers.rwkv.time_mix import TimeMix, group_norm_heads
from layers.rwkv.token_shift import token_shift
from layers.rwkv.wkv7 import unit_lower_inverse, wkv7, wkv7_apply, wkv7_chunked
