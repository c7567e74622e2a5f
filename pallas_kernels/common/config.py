"""Static configuration of the flash-attention kernels: target chip and block sizes.

A `FlashAttentionConfig` is plain, hashable data. The kernels read the chip from
it and never ask the runtime which device they run on, so the same code traces
and exports for a TPU or a Hopper GPU from any host. `default_config()` is the
one helper that looks at `jax.devices()[0]`; call it outside `jax.jit` and pass
the result down.

Block sizes left as None are filled per head dim from the chip's tuned table
(`resolve`). The tables are starting points taken from the published kernels'
defaults; they have not been tuned on hardware yet.
"""

import dataclasses

import jax

# Chip name -> (platform, hardware generation, canonical jax device_kind).
# 'gpu' chips run the Mosaic GPU kernel (Hopper, sm_90a); 'tpu' chips run the
# Mosaic TPU kernel. The device kind names an AbstractDevice for export.
CHIPS = {
    "h100": ("gpu", "sm_90a", "NVIDIA H100 80GB HBM3"),
    "h200": ("gpu", "sm_90a", "NVIDIA H200"),
    "tpu_v4": ("tpu", "v4", "TPU v4"),
    "tpu_v5e": ("tpu", "v5e", "TPU v5 lite"),
    "tpu_v5p": ("tpu", "v5p", "TPU v5"),
    "tpu_v6e": ("tpu", "v6e", "TPU v6 lite"),
}

# The GPU kernels of the recurrences (SsdConfig / Wkv7Config.gpu_kernel): Mosaic GPU (the
# default on Hopper) or Pallas Triton, kept until a hardware run picks one.
GPU_KERNELS = ("mosaic", "triton")

# `jax.Device.device_kind` -> chip name.
_DEVICE_KINDS = {
    "NVIDIA H100 80GB HBM3": "h100",
    "NVIDIA H100 PCIe": "h100",
    "NVIDIA H100 NVL": "h100",
    "NVIDIA H200": "h200",
    "TPU v4": "tpu_v4",
    "TPU v5 lite": "tpu_v5e",
    "TPU v5e": "tpu_v5e",
    "TPU v5": "tpu_v5p",
    "TPU v5p": "tpu_v5p",
    "TPU v6 lite": "tpu_v6e",
    "TPU v6e": "tpu_v6e",
}

_BLOCK_FIELDS = ("block_q", "block_kv", "block_q_dq", "block_kv_dq",
                 "block_q_dkv", "block_kv_dkv")

# Hopper: block_q is per compute warpgroup (a CTA runs two, 2 * block_q rows).
# Shared memory per CTA (bf16): fwd 2*bq*d*2 (Q) + 2*steps*bkv*d*2 (K, V ring);
# every entry fits 227 KiB (checked by
# tests/pallas_kernels/flash_attention/test_flash_attention_lowering.py).
# Keys: head dims up to and including the key.
_GPU_TABLE = {
    64: dict(block_q=64, block_kv=128, block_q_dq=64, block_kv_dq=128,
             block_q_dkv=64, block_kv_dkv=64, max_concurrent_steps=3,
             compute_wgs_bwd=2),
    128: dict(block_q=64, block_kv=128, block_q_dq=64, block_kv_dq=64,
              block_q_dkv=64, block_kv_dkv=64, max_concurrent_steps=2,
              compute_wgs_bwd=2),
    256: dict(block_q=64, block_kv=64, block_q_dq=64, block_kv_dq=64,
              block_q_dkv=64, block_kv_dkv=64, max_concurrent_steps=2,
              compute_wgs_bwd=1),
}

# TPU: block sizes are multiples of 128 (lanes); VMEM holds the double-buffered
# q/k/v/o blocks plus f32 accumulators, well inside 16 MiB (v5e's scoped default).
_TPU_TABLE = {
    64: dict(block_q=512, block_kv=512, block_q_dq=512, block_kv_dq=512,
             block_q_dkv=512, block_kv_dkv=512),
    128: dict(block_q=512, block_kv=512, block_q_dq=512, block_kv_dq=256,
              block_q_dkv=256, block_kv_dkv=512),
    256: dict(block_q=256, block_kv=512, block_q_dq=256, block_kv_dq=256,
              block_q_dkv=256, block_kv_dkv=256),
}

# Per-chip tables (identical per platform until tuned on each chip).
TABLES = {chip: (_GPU_TABLE if platform == "gpu" else _TPU_TABLE)
          for chip, (platform, _, _) in CHIPS.items()}

MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class FlashAttentionConfig:
  """Chip and block sizes for one flash-attention call (hashable, static).

  Attributes:
    chip: a key of CHIPS ('h100', 'h200', 'tpu_v4', 'tpu_v5e', 'tpu_v5p',
      'tpu_v6e'). Picks the kernel (Mosaic GPU or Mosaic TPU) and the table.
    block_q, block_kv: forward tile (rows of q, rows of k/v). On GPU block_q is
      per compute warpgroup; a CTA covers 2 * block_q query rows.
    block_q_dq, block_kv_dq: tile of the dq backward kernel.
    block_q_dkv, block_kv_dkv: tile of the dk/dv backward kernel.
    max_concurrent_steps: GPU only: depth of the TMA rings (SMEM slots).
    compute_wgs_bwd: GPU only: compute warpgroups per CTA of the backward
      kernels (1 or 2; 1 where 2 would overflow shared memory).
    None fields are filled from the chip's table by `resolve(head_dim)`.
  """
  chip: str
  block_q: int | None = None
  block_kv: int | None = None
  block_q_dq: int | None = None
  block_kv_dq: int | None = None
  block_q_dkv: int | None = None
  block_kv_dkv: int | None = None
  max_concurrent_steps: int | None = None
  compute_wgs_bwd: int | None = None

  def __post_init__(self):
    if self.chip not in CHIPS:
      raise ValueError(f"config.chip={self.chip!r}; choose one of {sorted(CHIPS)}.")
    for name in _BLOCK_FIELDS:
      value = getattr(self, name)
      if value is not None and (value <= 0 or value % 8):
        raise ValueError(f"config.{name}={value} must be a positive multiple of 8.")
    if self.max_concurrent_steps is not None and self.max_concurrent_steps < 2:
      raise ValueError(
          f"config.max_concurrent_steps={self.max_concurrent_steps} must be >= 2.")
    if self.compute_wgs_bwd not in (None, 1, 2):
      raise ValueError(f"config.compute_wgs_bwd={self.compute_wgs_bwd} must be 1 or 2.")

  @property
  def platform(self) -> str:
    """'gpu' or 'tpu': which kernel family serves this chip."""
    return CHIPS[self.chip][0]

  @property
  def arch(self) -> str:
    """Hardware generation ('sm_90a', 'v5e', ...)."""
    return CHIPS[self.chip][1]

  @property
  def device_kind(self) -> str:
    """The chip's jax device_kind (for an AbstractDevice when exporting)."""
    return CHIPS[self.chip][2]

  def resolve(self, head_dim: int) -> "FlashAttentionConfig":
    """This config with every None filled from the chip's table for head_dim."""
    table = TABLES[self.chip]
    key = next((k for k in sorted(table) if head_dim <= k), None)
    if key is None:
      raise ValueError(f"head_dim={head_dim} is larger than {MAX_HEAD_DIM}, the "
                       f"largest head dim the {self.chip} table covers.")
    filled = {name: value for name, value in table[key].items()
              if getattr(self, name) is None}
    return dataclasses.replace(self, **filled)


def chip_of_device(device: jax.Device) -> str | None:
  """The CHIPS name of `device`, or None when no kernel targets it (CPU, A100)."""
  kind = device.device_kind
  if kind in _DEVICE_KINDS:
    return _DEVICE_KINDS[kind]
  if device.platform == "gpu" and ("H100" in kind or "H200" in kind or "GH200" in kind):
    return "h200" if "H200" in kind else "h100"
  return None


def default_config(chip: str | None = None) -> FlashAttentionConfig:
  """The tuned default config for `chip`, or for `jax.devices()[0]` when None.

  Call outside `jax.jit` (it may query the runtime). On a host with no kernel
  target (CPU) it returns the TPU v5e config, which interpret mode runs.
  """
  if chip is None:
    chip = chip_of_device(jax.devices()[0]) or "tpu_v5e"
  return FlashAttentionConfig(chip=chip)
