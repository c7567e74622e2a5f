"""SSD (Mamba-2 state-space duality): Mosaic TPU, Mosaic GPU and Triton GPU kernels, fwd and bwd.

    from pallas_kernels.ssd import SsdConfig, ssd
    y, final_state = ssd(x, dt, a, bmat, cmat, d_skip, chunk_size=256,
                         config=SsdConfig("h100"))

api: ssd (checks, SsdConfig, chunk layout and padding, the custom VJP);
reference: the chunked jnp SSD (`ssd_reference`, `document_index`), also the
'xla' path of layers/ssm; tpu / gpu_mosaic / gpu (Triton): the forward
kernels; tpu_bwd / gpu_mosaic_bwd (16-bit inputs) / gpu_bwd: the reverse-scan
backward kernels; bwd_step: one chunk's backward maths, which the TPU and
Triton backward kernels run (gpu_mosaic_bwd writes it as wgmma products).
"""

from pallas_kernels.ssd.api import SsdConfig, default_config, ssd, unsupported
from pallas_kernels.ssd.reference import document_index
from pallas_kernels.ssd.reference import ssd as ssd_reference

__all__ = ["SsdConfig", "default_config", "document_index", "ssd", "ssd_reference",
           "unsupported"]
