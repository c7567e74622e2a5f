"""State-space sequence mixers (Mamba-1 and Mamba-2).

  ssd.py     `ssd`: the state-space-duality scan, 'xla' (chunked jnp, pallas_kernels/ssd/
             reference.py) or 'pallas' (pallas_kernels/ssd); `resolve_impl`, `document_index`
  conv.py    `causal_conv` / `CausalConv`: depthwise causal conv with document resets
  mamba2.py  `Mamba2Mixer`: the Linen layer (projections, conv, SSD, gated norm, decode cache)
  selective_scan.py  `selective_scan`: Mamba-1's per-channel scan (chunked associative scan)
  mamba1.py  `Mamba1Mixer`: the Mamba-1 Linen layer (projections, conv, selective scan, cache)
"""

from layers.ssm.conv import CausalConv, causal_conv
from layers.ssm.mamba1 import Mamba1Mixer
from layers.ssm.mamba2 import GatedRMSNorm, Mamba2Mixer
from layers.ssm.selective_scan import selective_scan
from layers.ssm.ssd import document_index, ssd
