"""Block-sparse attention under a static mask: Mosaic GPU (Hopper) and Mosaic TPU kernels.

    from pallas_kernels.block_sparse import CausalMask, LocalMask, block_sparse_attention
    out = block_sparse_attention(q, k, v, CausalMask() & LocalMask(4096, 0))

masks: the Mask objects and their tile kinds (SKIP, PARTIAL, FULL);
block_map: build_block_map, the tiles each kernel visits; api:
block_sparse_attention (checks, padding, the custom VJP); reference: the
plain-jnp oracle; tpu / tpu_bwd and gpu / gpu_bwd: the forward and the dq and
dk/dv kernels per platform.
"""

from pallas_kernels.block_sparse.api import block_sparse_attention
from pallas_kernels.block_sparse.block_map import BlockMap, KernelMap, build_block_map
from pallas_kernels.block_sparse.masks import (FULL, PARTIAL, SKIP, AndMask, BlockMask,
                                               CausalMask, ChunkedCausalMask, FullMask,
                                               LocalMask, Mask, OrMask, PrefixLMMask,
                                               random_block_mask)
from pallas_kernels.block_sparse.reference import block_sparse_attention_reference

__all__ = ["FULL", "PARTIAL", "SKIP", "AndMask", "BlockMap", "BlockMask", "CausalMask",
           "ChunkedCausalMask", "FullMask", "KernelMap", "LocalMask", "Mask", "OrMask",
           "PrefixLMMask", "block_sparse_attention", "block_sparse_attention_reference",
           "build_block_map", "random_block_mask"]
