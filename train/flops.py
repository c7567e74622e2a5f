"""Device peaks, for MFU.

MFU = achieved model FLOP/s / peak FLOP/s of the devices. The model FLOPs come
from the family's config (e.g. `LlamaConfig.train_flops_per_token`) through
its task (`Task.train_flops_per_batch`).
"""

# Dense bf16 peak FLOP/s per device, by the prefix of `jax.Device.device_kind`.
PEAK_FLOPS = (
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one device; None when unknown (e.g. CPU) and not overridden."""
  if override_tflops:
    return override_tflops * 1e12
  for prefix, peak in PEAK_FLOPS:
    if device_kind.startswith(prefix):
      return peak
  return None
