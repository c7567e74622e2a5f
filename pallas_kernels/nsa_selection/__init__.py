"""Selected-block attention (NSA's selection branch): Mosaic GPU and Mosaic TPU kernels.

    from pallas_kernels.nsa_selection import selected_block_attention
    out = selected_block_attention(q, k, v, block_indices, block_size=64)

api: selected_block_attention (checks, the block table, the GPU custom VJP);
reference: the plain-jnp oracle; tpu / tpu_bwd: the Mosaic TPU forward / dq
and dk/dv kernels, tpu_core: their XLA driver (query chunks, pair lists, the
TPU custom VJP); gpu / gpu_bwd: the Mosaic GPU forward / dq and dk/dv kernels.
"""

from pallas_kernels.nsa_selection.api import selected_block_attention
from pallas_kernels.nsa_selection.reference import selected_block_attention_reference

__all__ = ["selected_block_attention", "selected_block_attention_reference"]
