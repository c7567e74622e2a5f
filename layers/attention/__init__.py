"""Causal self-attention layers and the attention implementation switch.

  dense.py             `Attention`: grouped-query attention with RoPE and a KV cache.
  implementations.py   pure attention functions and the 'auto' | 'xla' | 'cudnn' |
                       'pallas' switch that `Attention` dispatches through.
  nsa.py               `NativeSparseAttention`, a drop-in for `Attention`, and its
                       own 'auto' | 'xla' | 'pallas' switch (`nsa.resolve_impl`).
  nsa_compression.py   NSA's compression branch, block selection and masks.

Shapes: see layers/__init__.py.
"""

from layers.attention.dense import Attention
from layers.attention.implementations import (
    IMPLEMENTATIONS, attention_mask, default_backend, dot_product_attention, resolve_impl,
    xla_attention)
from layers.attention.nsa import NativeSparseAttention

__all__ = [
    "IMPLEMENTATIONS", "Attention", "NativeSparseAttention", "attention_mask",
    "default_backend", "dot_product_attention", "resolve_impl", "xla_attention",
]
