"""`config.model` of the Mamba family ('mamba'; Mamba-1 or Mamba-2 blocks): fields, defaults,
checks, FLOPs.

The defaults are the tiny CPU model of configs/mamba_tiny.py (Mamba-2);
configs/mamba.py sets the published mamba-130m ... 2.8b (version 1) and
mamba2-130m ... 2.7b (version 2) shapes. `model.attention_layers` makes a
Jamba-style hybrid: Llama decoder blocks (attention + MLP, shaped by
`model.attention.*`) at those depths (models/mamba/hybrid.py).
Shapes: see layers/__init__.py.
"""

import dataclasses
import math
from typing import ClassVar

from layers import attention as attention_lib
from layers.ssm.ssd import IMPLEMENTATIONS as SSM_IMPLEMENTATIONS
from layers.ssm.ssd import resolve_impl as resolve_ssm_impl
from models.config_schema import ConfigSection, ModelConfig, field, section
from pallas_kernels.common.config import CHIPS
from models.llama.config import REMAT_POLICIES, check_choice, check_dtype_names


@dataclasses.dataclass(frozen=True, kw_only=True)
class HybridAttentionConfig(ConfigSection):
  """The Llama decoder blocks of a hybrid (`model.attention_layers`): GQA attention with
  RoPE, then a SwiGLU MLP; embed width, norms and dtypes are the Mamba model's."""
  num_heads: int = field(4, "Query heads (h).")
  num_kv_heads: int = field(2, "Key/value heads (k, GQA); divides num_heads.")
  head_dim: int = field(32, "Per-head width (d); even (RoPE).")
  mlp_dim: int = field(384, "SwiGLU hidden width (m).")
  rope_theta: float = field(10_000.0, "RoPE base frequency.")

  def __post_init__(self):
    for name in ("num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"model.attention.{name}={getattr(self, name)} must be positive.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.attention.num_heads={self.num_heads} must be a multiple of "
                       f"model.attention.num_kv_heads={self.num_kv_heads} (grouped-query "
                       "attention).")
    if self.head_dim % 2:
      raise ValueError(f"model.attention.head_dim={self.head_dim} must be even for RoPE.")
    if self.rope_theta <= 0:
      raise ValueError(f"model.attention.rope_theta={self.rope_theta} must be positive.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MambaConfig(ModelConfig):
  """A pre-norm stack of Mamba-1 or Mamba-2 mixers (no MLP), RMSNorm, LM head;
  attention_layers puts Llama decoder blocks (attention + MLP) at some depths (a
  Jamba-style hybrid)."""
  family: ClassVar[str] = "mamba"

  vocab_size: int = field(512, "Embedding rows; must be >= the tokenizer's vocabulary.")
  embed_dim: int = field(128, "Residual stream width (e).")
  num_layers: int = field(4, "Blocks (L), attention blocks of a hybrid included.")
  # Which Mamba. The four fields after `version` shape only Mamba-1 (version 2 checks they
  # are left at their defaults); num_heads, head_dim, num_groups and time_step_limit shape
  # only Mamba-2 (version 1 ignores them). chunk_size is the scan's chunk in both.
  version: int = field(2, "1: Mamba-1 mixers (selective scan; transformers MambaForCausalLM) | "
                       "2: Mamba-2 mixers (SSD; Mamba2ForCausalLM).")
  expand: int = field(2, "Version 1: inner width i = expand·embed_dim (version 2's is "
                      "num_heads·head_dim).")
  time_step_rank: int | str = field("auto", "Version 1: rank R of the dt projection (Mamba's "
                                    "dt_rank); 'auto' is ceil(embed_dim / 16).")
  use_bias: bool = field(False, "Version 1: biases on the mixer's in and out projections.")
  use_conv_bias: bool = field(True, "Version 1: a bias on the causal convolution (version 2 "
                              "always has one).")
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
  # Hybrid (Jamba-style) stacks: attention blocks at some depths.
  attention_layers: tuple[int, ...] = field(
      (), "0-based depths, increasing, whose block is a Llama decoder block (attention + "
      "MLP) instead of a Mamba mixer; () = pure Mamba.")
  attention: HybridAttentionConfig = section(
      HybridAttentionConfig, "The attention blocks at model.attention_layers.")
  attention_impl: str = field("auto", "Attention blocks: xla | cudnn | pallas | auto.",
                              shapes_params=False)
  attention_chip: str = field("", "Attention blocks' Pallas kernel target (h100, tpu_v5e, "
                              "...); '' = this machine's.", shapes_params=False)
  scan_layers: bool = field(True, "nn.scan over identical blocks (faster compile; a hybrid "
                            "scans each run of Mamba blocks between attention blocks).")
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
    self._check_version_fields()
    self._check_ssm_impl()
    self._check_hybrid()

  def _check_version_fields(self):
    if self.version not in (1, 2):
      raise ValueError(f"model.version={self.version!r} must be 1 (Mamba-1) or 2 (Mamba-2).")
    if self.expand <= 0:
      raise ValueError(f"model.expand={self.expand} must be positive.")
    rank = self.time_step_rank
    if not (rank == "auto" or (isinstance(rank, str) and rank.isdigit() and int(rank) > 0)
            or (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0)):
      raise ValueError(f"model.time_step_rank={rank!r} must be 'auto' (ceil(embed_dim / 16)) "
                       "or a positive integer.")
    if self.version == 2:
      for name, default in (("expand", 2), ("time_step_rank", "auto"), ("use_bias", False),
                            ("use_conv_bias", True)):
        if getattr(self, name) != default:
          raise ValueError(f"model.{name}={getattr(self, name)!r} applies to model.version=1 "
                           f"only; leave it at {default!r} for version 2 or set version=1.")

  def _check_ssm_impl(self) -> None:
    check_choice("ssm_impl", self.ssm_impl, SSM_IMPLEMENTATIONS)
    if self.ssm_chip and self.ssm_chip not in CHIPS:
      raise ValueError(f"model.ssm_chip={self.ssm_chip!r}; choose one of {sorted(CHIPS)} or "
                       "'' (this machine's).")
    if self.ssm_impl == "pallas" and self.version == 2:  # Mamba-1's scan has no kernel switch.
      # Raises, naming model.ssm_impl, where the chip's kernel cannot serve the shapes;
      # chip '' (CPU) interprets the TPU kernel, and on_chip re-checks for a device's chip.
      resolve_ssm_impl("pallas", backend="tpu", chip=self.ssm_chip or "tpu_v5e",
                       head_dim=self.head_dim, state_size=self.state_size,
                       chunk_size=self.chunk_size, dtype=self.dtype)

  def _check_hybrid(self) -> None:
    check_choice("attention_impl", self.attention_impl, attention_lib.IMPLEMENTATIONS)
    if isinstance(self.attention_layers, list):  # Built in Python with a list: keep it hashable.
      object.__setattr__(self, "attention_layers", tuple(self.attention_layers))
    depths = self.attention_layers
    for depth in depths:
      if isinstance(depth, bool) or not isinstance(depth, int):
        raise ValueError(f"model.attention_layers={depths} must hold int depths, got "
                         f"{depth!r}.")
      if not 0 <= depth < self.num_layers:
        raise ValueError(f"model.attention_layers={depths} has depth {depth}, outside the "
                         f"0-based depths 0..{self.num_layers - 1} of "
                         f"model.num_layers={self.num_layers}.")
    if len(set(depths)) != len(depths):
      raise ValueError(f"model.attention_layers={depths} repeats a depth; list each once.")
    if list(depths) != sorted(depths):
      raise ValueError(f"model.attention_layers={depths} must be increasing: write "
                       f"{tuple(sorted(depths))}.")

  @property
  def num_mamba_layers(self) -> int:
    """Blocks with a Mamba mixer (num_layers less the attention blocks)."""
    return self.num_layers - len(self.attention_layers)

  def on_chip(self, chip):
    unset = {name: chip for name in ("attention_chip", "ssm_chip") if not getattr(self, name)}
    return dataclasses.replace(self, **unset) if unset else self

  @property
  def inner_dim(self) -> int:
    """The mixer's inner width: i = expand·e (version 1), h·d (version 2)."""
    if self.version == 1:
      return self.expand * self.embed_dim
    return self.num_heads * self.head_dim

  @property
  def dt_rank(self) -> int:
    """R, the rank of Mamba-1's dt projection (`time_step_rank` with 'auto' resolved)."""
    if self.time_step_rank == "auto":
      return math.ceil(self.embed_dim / 16)
    return int(self.time_step_rank)

  def sharded_sizes(self):
    if self.version == 1:
      sizes = {"expand·embed_dim": ("mlp", self.inner_dim)}
    else:
      sizes = {"num_heads": ("heads", self.num_heads)}
    if self.attention_layers:
      sizes.update({"attention.num_heads": ("heads", self.attention.num_heads),
                    "attention.num_kv_heads": ("kv_heads", self.attention.num_kv_heads)})
    return sizes

  def matmul_params(self) -> int:
    """Weights each token multiplies with (projections and head; not the embedding lookup)."""
    if self.version == 1:
      i, r, n = self.inner_dim, self.dt_rank, self.state_size
      mixer = self.embed_dim * 2 * i + i * (r + 2 * n) + r * i + i * self.embed_dim
    else:
      in_proj = self.embed_dim * (2 * self.inner_dim + 2 * self.num_groups * self.state_size
                                  + self.num_heads)
      mixer = in_proj + self.inner_dim * self.embed_dim
    return (self.num_mamba_layers * mixer
            + len(self.attention_layers) * self.attention_block_matmul_params()
            + self.embed_dim * self.vocab_size)

  def attention_block_matmul_params(self) -> int:
    """Weights of one hybrid attention block: q, k, v, output projections and the MLP."""
    a = self.attention
    return self.embed_dim * (a.head_dim * (2 * a.num_heads + 2 * a.num_kv_heads)
                             + 3 * a.mlp_dim)

  def ssd_flops_per_token(self, seq_len: int) -> float:
    """Forward + backward FLOPs of the chunked SSD per token: the in-chunk C·Bᵀ scores
    and their product with x over a whole chunk, the chunk state and its read-out."""
    chunk = min(self.chunk_size, seq_len)
    in_chunk = 2 * chunk * (self.num_groups * self.state_size + self.inner_dim)
    states = 4 * self.inner_dim * self.state_size
    return 3.0 * self.num_mamba_layers * (in_chunk + states)

  def selective_scan_flops_per_token(self) -> float:
    """Forward + backward FLOPs of Mamba-1's scan per token, counted as the recurrence
    (per channel and state: decay, input and update 3, read-out 2, discretising 1)."""
    return 3.0 * self.num_mamba_layers * 6 * self.inner_dim * self.state_size

  def train_flops_per_token(self, seq_len: int) -> float:
    """6 · N_matmul + the scan's own FLOPs (SSD for version 2, selective scan for 1)
    + causal attention's in a hybrid (12·h·d·t/2 per attention block, as LlamaConfig
    counts them)."""
    attention = (len(self.attention_layers) * 12.0 * self.attention.num_heads
                 * self.attention.head_dim * seq_len / 2)
    if self.version == 1:
      scan = self.selective_scan_flops_per_token()
    else:
      scan = self.ssd_flops_per_token(seq_len)
    return 6.0 * self.matmul_params() + scan + attention
