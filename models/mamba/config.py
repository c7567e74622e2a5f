"""`config.model` of the Mamba family ('mamba'; Mamba-2 blocks): fields, defaults, checks, FLOPs.

The defaults are the tiny CPU model of configs/mamba_tiny.py; configs/mamba.py
sets the published mamba2-130m / 370m shapes. Shapes: see layers/__init__.py.
"""

import dataclasses
import math
from typing import ClassVar

from layers.ssm.ssd import IMPLEMENTATIONS as SSM_IMPLEMENTATIONS
from layers.ssm.ssd import resolve_impl as resolve_ssm_impl
from pallas_kernels.common.config import CHIPS
from models.config_schema import ModelConfig, field
from models.llama.config import REMAT_POLICIES, check_choice, check_dtype_names


@dataclasses.dataclass(frozen=True, kw_only=True)
class MambaConfig(ModelConfig):
  """A pre-norm stack of Mamba-2 mixers (no attention, no MLP), RMSNorm, LM head."""
  family: ClassVar[str] = "mamba"

  vocab_size: int = field(512, "Embedding rows; must be >= the tokenizer's vocabulary.")
  embed_dim: int = field(128, "Residual stream width (e).")
  num_layers: int = field(4, "Mamba-2 blocks (L).")
  num_heads: int = field(8, "SSM heads (h); num_heads·head_dim is the inner width (expand·e).")
  head_dim: int = field(32, "Per-head width (d).")
  state_size: int = field(32, "SSM state size per head (N).")
  num_groups: int = field(1, "Groups sharing B and C (ng); divides num_heads.")
  conv_kernel: int = field(4, "Causal depthwise convolution width (w).")
  chunk_size: int = field(64, "SSD chunk length (computation only).", shapes_params=False)
  time_step_limit: tuple[float, float] = field(
      (0.0, math.inf), "(min, max) clamp of dt after the softplus.", shapes_params=False)
  max_seq_len: int = field(256, "Longest row of data and of prompt + sampled tokens (the "
                           "recurrent state itself has no length limit).", shapes_params=False)
  norm_eps: float = field(1e-5, "RMSNorm epsilon (block, gated and final norms).")
  ssm_impl: str = field("auto", "SSD scan: xla | pallas | auto (pallas on a TPU or Hopper "
                        "GPU whose kernel serves the shapes, else xla).", shapes_params=False)
  ssm_chip: str = field("", "Pallas SSD kernel target (h100, tpu_v5e, ...); '' = this "
                        "machine's.", shapes_params=False)
  tie_embeddings: bool = field(False, "Share the input embedding and the output projection.")
  scan_layers: bool = field(True, "nn.scan over identical blocks (faster compile).")
  remat_policy: str = field("none", "none | full | dots_saveable | "
                            "dots_with_no_batch_dims_saveable.", shapes_params=False)
  dtype: str = field("bfloat16", "Computation dtype (SSM states stay float32).",
                     shapes_params=False)
  param_dtype: str = field("float32", "Parameter storage dtype.")

  def __post_init__(self):
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "head_dim", "state_size",
                 "num_groups", "conv_kernel", "chunk_size", "max_seq_len"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"model.{name}={getattr(self, name)} must be positive.")
    if self.num_heads % self.num_groups:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                       f"model.num_groups={self.num_groups} (heads of a group share B and C).")
    low, high = self.time_step_limit
    if len(self.time_step_limit) != 2 or not 0.0 <= low < high:
      raise ValueError(f"model.time_step_limit={self.time_step_limit} must be (min, max) with "
                       "0 <= min < max.")
    check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
    check_dtype_names(self)
    check_choice("ssm_impl", self.ssm_impl, SSM_IMPLEMENTATIONS)
    if self.ssm_chip and self.ssm_chip not in CHIPS:
      raise ValueError(f"model.ssm_chip={self.ssm_chip!r}; choose one of {sorted(CHIPS)} or "
                       "'' (this machine's).")
    if self.ssm_impl == "pallas":
      # Raises, naming model.ssm_impl, where the chip's kernel cannot serve the shapes;
      # chip '' (CPU) interprets the TPU kernel, and on_chip re-checks for a device's chip.
      resolve_ssm_impl("pallas", backend="tpu", chip=self.ssm_chip or "tpu_v5e",
                       head_dim=self.head_dim, state_size=self.state_size,
                       chunk_size=self.chunk_size, dtype=self.dtype)

  def on_chip(self, chip):
    return self if self.ssm_chip else dataclasses.replace(self, ssm_chip=chip)

  @property
  def inner_dim(self) -> int:
    """The mixer's inner width h·d (expand·e)."""
    return self.num_heads * self.head_dim

  def sharded_sizes(self):
    return {"num_heads": ("heads", self.num_heads)}

  def matmul_params(self) -> int:
    """Weights each token multiplies with (projections and head; not the embedding lookup)."""
    in_proj = self.embed_dim * (2 * self.inner_dim + 2 * self.num_groups * self.state_size
                                + self.num_heads)
    out_proj = self.inner_dim * self.embed_dim
    return self.num_layers * (in_proj + out_proj) + self.embed_dim * self.vocab_size

  def ssd_flops_per_token(self, seq_len: int) -> float:
    """Forward + backward FLOPs of the chunked SSD per token: the in-chunk C·Bᵀ scores
    and their product with x over a whole chunk, the chunk state and its read-out."""
    chunk = min(self.chunk_size, seq_len)
    in_chunk = 2 * chunk * (self.num_groups * self.state_size + self.inner_dim)
    states = 4 * self.inner_dim * self.state_size
    return 3.0 * self.num_layers * (in_chunk + states)

  def train_flops_per_token(self, seq_len: int) -> float:
    """6 · N_matmul + the SSD's own matmuls."""
    return 6.0 * self.matmul_params() + self.ssd_flops_per_token(seq_len)
