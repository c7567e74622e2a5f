"""State-space sequence mixers (Mamba-2).

  ssd.py     `ssd`: the state-space-duality scan, 'xla' (chunked jnp, pallas_kernels/ssd/
             reference.py) or 'pallas' (pallas_kernels/ssd); `resolve_impl`, `document_index`
  conv.py    `causal_conv` / `CausalConv`: depthwise causal conv with document resets
  mamba2.py  `Mamba2Mixer`: the Linen layer (projections, conv, SSD, gated norm, decode cache)
"""

from layers.ssm.conv import CausalConv, causal_conv
from layers.ssm.mamba2 import GatedRMSNorm, Mamba2Mixer
from layers.ssm.ssd import document_index, ssd
