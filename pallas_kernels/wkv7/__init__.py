"""RWKV-7's WKV recurrence (generalized delta rule) as Pallas kernels, with its plain-jnp forms.

    from pallas_kernels.wkv7 import Wkv7Config, wkv7_pallas
    y, state = wkv7_pallas(r, w, k, v, a, b, doc=doc, initial_state=s0,
                           config=Wkv7Config("tpu_v5e", chunk_size=16))

api: wkv7_pallas (checks, padding, the custom VJP), Wkv7Config; reference: the
plain-jnp forms `wkv7` (sequential scan) and `wkv7_chunked` (matrix form per
chunk), which the model's 'xla' path uses too; chunk: the in-chunk matrix form
and its VJP, which the TPU and Triton kernel bodies run; tpu / tpu_bwd: the Mosaic
TPU forward and backward (reverse chunk scan); gpu_mosaic / gpu_mosaic_bwd: the
Mosaic GPU forward and backward (Hopper wgmma, the GPU default); gpu / gpu_bwd:
the Pallas Triton ones (`Wkv7Config(gpu_kernel='triton')`).
"""

from pallas_kernels.wkv7.api import (CHUNK_SIZES, GPU_KERNELS, HEAD_SIZES, Wkv7Config,
                                     unsupported_reason, wkv7_pallas)
from pallas_kernels.wkv7.reference import unit_lower_inverse, wkv7, wkv7_chunked

__all__ = ["CHUNK_SIZES", "GPU_KERNELS", "HEAD_SIZES", "Wkv7Config", "unit_lower_inverse",
           "unsupported_reason", "wkv7", "wkv7_chunked", "wkv7_pallas"]
