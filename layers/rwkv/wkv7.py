"""The RWKV-7 WKV recurrence in plain jnp: re-exported from pallas_kernels/wkv7/reference.py.

The sequential `wkv7` (decode steps, the model's reference) and the chunked matrix
form `wkv7_chunked` (the `model.rwkv_impl='xla'` training path) live beside the
Pallas kernel that computes the same thing (pallas_kernels.wkv7.wkv7_pallas), so
that the kernel's oracle and its backward fallback are this very code.
"""

from pallas_kernels.wkv7.reference import unit_lower_inverse, wkv7, wkv7_chunked

__all__ = ["unit_lower_inverse", "wkv7", "wkv7_chunked"]
