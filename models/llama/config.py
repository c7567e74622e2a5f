"""`config.model` of the dense decoder family ('llama'): fields, defaults, checks, FLOPs.

The defaults are the tiny CPU model of configs/llama_tiny.py; configs/llama.py
sets the published Llama 3 shapes. Shapes: see layers/__init__.py.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from layers import attention as attention_lib
from models.config_schema import ConfigSection, ModelConfig, field, section

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTIONS = ("full", "nsa")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NsaConfig(ConfigSection):
  """Native Sparse Attention (`model.attention='nsa'`; layers/attention/nsa.py)."""
  compress_block: int = field(32, "Tokens per compressed block (l).")
  compress_stride: int = field(16, "Stride between compressed blocks (st).")
  select_block: int = field(64, "Tokens per selectable block (B).")
  select_top_n: int = field(16, "Blocks each query group attends, first and local included (ns).")
  window: int = field(512, "Sliding-window branch width in tokens.")

  def __post_init__(self):
    for name in ("compress_block", "compress_stride", "select_block", "select_top_n", "window"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model.nsa.{name}={getattr(self, name)} must be positive.")


def _check_positive(config, names) -> None:
  for name in names:
    if int(getattr(config, name)) <= 0:
      raise ValueError(f"model.{name}={getattr(config, name)} must be positive.")


def check_dtype_names(config, names=("dtype", "param_dtype")) -> None:
  for name in names:
    try:
      jnp.dtype(getattr(config, name))
    except TypeError as e:
      raise ValueError(f"model.{name}={getattr(config, name)!r} is not a dtype name "
                       "(e.g. 'bfloat16', 'float32').") from e


def check_choice(name: str, value: str, choices) -> None:
  if value not in choices:
    raise ValueError(f"model.{name}={value!r}; choose one of {tuple(choices)}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
  """A Llama-style decoder: RMSNorm, GQA attention with RoPE, SwiGLU."""
  family: ClassVar[str] = "llama"

  vocab_size: int = field(512, "Embedding rows; must be >= the tokenizer's vocabulary.")
  embed_dim: int = field(128, "Residual stream width (e).")
  num_layers: int = field(4, "Decoder blocks (L).")
  num_heads: int = field(4, "Query heads (h).")
  num_kv_heads: int = field(2, "Key/value heads (k, GQA); divides num_heads.")
  head_dim: int = field(32, "Per-head width (d).")
  mlp_dim: int = field(384, "SwiGLU hidden width (m).")
  max_seq_len: int = field(256, "Longest sequence (KV-cache capacity when sampling).",
                           shapes_params=False)
  rope_theta: float = field(10_000.0, "RoPE base frequency.")
  norm_eps: float = field(1e-6, "RMSNorm epsilon.")
  tie_embeddings: bool = field(False, "Share the input embedding and the output projection.")
  qkv_bias: bool = field(False, "Biases on the query/key/value projections (Qwen2-style).")
  attention: str = field("full", "full (dense causal) | nsa (Native Sparse Attention).")
  nsa: NsaConfig = section(NsaConfig, "Native Sparse Attention, when attention='nsa'.")
  attention_impl: str = field("auto", "xla | cudnn | pallas | auto.", shapes_params=False)
  attention_chip: str = field("", "Pallas kernel target (h100, tpu_v5e, ...); '' = this "
                              "machine's.", shapes_params=False)
  scan_layers: bool = field(True, "nn.scan over identical blocks (faster compile).")
  remat_policy: str = field("none", "none | full | dots_saveable | "
                            "dots_with_no_batch_dims_saveable.", shapes_params=False)
  dtype: str = field("bfloat16", "Computation dtype.", shapes_params=False)
  param_dtype: str = field("float32", "Parameter storage dtype.")

  def __post_init__(self):
    _check_positive(self, ("vocab_size", "embed_dim", "num_layers", "num_heads",
                           "num_kv_heads", "head_dim", "mlp_dim", "max_seq_len"))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads} (grouped-query attention).")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE.")
    check_choice("attention_impl", self.attention_impl, attention_lib.IMPLEMENTATIONS)
    check_choice("attention", self.attention, ATTENTIONS)
    if self.attention == "nsa" and self.attention_impl == "cudnn":
      raise ValueError("model.attention='nsa' has no cuDNN path: set model.attention_impl to "
                       "'auto', 'xla' or 'pallas'.")
    if self.attention == "nsa" and self.qkv_bias:
      raise ValueError("model.qkv_bias=True is not supported with model.attention='nsa'.")
    check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
    check_dtype_names(self)

  def on_chip(self, chip):
    return self if self.attention_chip else dataclasses.replace(self, attention_chip=chip)

  def sharded_sizes(self):
    return {"num_heads": ("heads", self.num_heads),
            "num_kv_heads": ("kv_heads", self.num_kv_heads)}

  def attention_matmul_params(self) -> int:
    """Weights of one attention layer's q, k, v and output projections."""
    return self.embed_dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)

  def matmul_params(self) -> int:
    """Weights each token multiplies with (everything but the embedding lookup)."""
    mlp = 3 * self.embed_dim * self.mlp_dim
    return (self.num_layers * (self.attention_matmul_params() + mlp)
            + self.embed_dim * self.vocab_size)

  def attention_flops_per_token(self, seq_len: int) -> float:
    """Causal attention's score and value matmuls, forward + backward (PaLM appendix B):
    half of full attention's 12·L·h·d·t."""
    return 6.0 * self.num_layers * self.num_heads * self.head_dim * seq_len

  def train_flops_per_token(self, seq_len: int) -> float:
    """6 · N_matmul + 6 · L · h · d · t (PaLM appendix B, causal attention)."""
    return 6.0 * self.matmul_params() + self.attention_flops_per_token(seq_len)
