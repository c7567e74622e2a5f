"""Flash attention: Mosaic GPU (Hopper) and Mosaic TPU kernels, forward and backward.

    from pallas_kernels.flash_attention import FlashAttentionConfig, flash_attention
    out = flash_attention(q, k, v, causal=True, config=FlashAttentionConfig("h100"))

api: flash_attention (checks, padding, the custom VJP); reference: the
plain-jnp oracle; tpu / tpu_bwd: the Mosaic TPU forward / dq and dk/dv
kernels; gpu / gpu_bwd: the Mosaic GPU ones. The chip config
(FlashAttentionConfig, default_config) lives in common/config.py.
"""

from pallas_kernels.common.config import FlashAttentionConfig, default_config
from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.flash_attention.reference import attention_reference

__all__ = ["FlashAttentionConfig", "attention_reference", "default_config", "flash_attention"]
