"""`config.model` of the dense decoder family ('llama'): fields, defaults, checks, FLOPs.

The defaults are the tiny CPU model of configs/llama_tiny.py; configs/llama.py
sets the published Llama 3 shapes. Qwen2/2.5, Qwen3, Mistral and Gemma 3 (text)
are settings of the same fields (configs/qwen.py, mistral.py, gemma.py): every
variant feature is one field whose default is the plain Llama behaviour.
Shapes: see layers/__init__.py.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from layers import attention as attention_lib
from layers.mlp import ACTIVATIONS
from layers.rope import ROPE_SCALING_KINDS, RopeScaling
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScalingConfig(ConfigSection):
  """RoPE frequency scaling (`model.rope_scaling`; layers/rope.py has the formulas)."""
  kind: str = field("none", f"{' | '.join(ROPE_SCALING_KINDS)}.", shapes_params=False)
  factor: float = field(1.0, "Context extension factor.", shapes_params=False)
  original_context: int = field(0, "Pre-training context in tokens (dynamic, yarn, llama3).",
                                shapes_params=False)
  low_freq_factor: float = field(1.0, "llama3: wavelengths above context/this are divided by "
                                 "factor.", shapes_params=False)
  high_freq_factor: float = field(4.0, "llama3: wavelengths below context/this are kept.",
                                  shapes_params=False)
  beta_fast: float = field(32.0, "yarn: ramp start, in rotations over the context.",
                           shapes_params=False)
  beta_slow: float = field(1.0, "yarn: ramp end, in rotations over the context.",
                           shapes_params=False)
  attention_factor: float = field(0.0, "yarn: cos/sin scale; 0 derives it from factor.",
                                  shapes_params=False)
  mscale: float = field(0.0, "yarn: with mscale_all_dim, derive the attention factor "
                        "DeepSeek's way; 0 = off.", shapes_params=False)
  mscale_all_dim: float = field(0.0, "yarn: see mscale.", shapes_params=False)
  truncate: bool = field(True, "yarn: round the ramp bounds to whole dimensions.",
                         shapes_params=False)

  def __post_init__(self):
    RopeScaling(**self.to_dict()).check("model.rope_scaling")

  def scaling(self) -> RopeScaling | None:
    """The layer-side RopeScaling, or None for kind='none'."""
    return None if self.kind == "none" else RopeScaling(**self.to_dict())


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
  rope_scaling: RopeScalingConfig = section(RopeScalingConfig, "RoPE frequency scaling "
                                            "(Llama 3.1 'llama3', linear, dynamic, yarn).")
  qk_norm: bool = field(False, "RMSNorm each query and key head before RoPE (Qwen3, Gemma 3).")
  norm_plus_one: bool = field(False, "Every RMSNorm scales by 1 + w instead of w (Gemma).")
  post_norms: bool = field(False, "Also RMSNorm the attention and MLP outputs before each "
                           "residual add (Gemma 2/3).")
  mlp_activation: str = field("silu", "Gate activation: silu (SwiGLU) | gelu_tanh (GeGLU, "
                              "Gemma).")
  embed_scale: bool = field(False, "Multiply the input embeddings by sqrt(embed_dim) (Gemma).")
  query_pre_attn_scalar: float = field(0.0, "Attention scores are q.k / sqrt(this); 0 means "
                                       "head_dim (Gemma 3 sets it).", shapes_params=False)
  sliding_window: int = field(0, "Tokens a query sees, itself included, in sliding-window "
                              "layers (Mistral, Gemma local layers); 0 = unlimited. Decode "
                              "caches of those layers hold this many tokens.",
                              shapes_params=False)
  global_every: int = field(0, "With sliding_window: layers n, 2n, ... (1-based) attend "
                            "globally, the rest locally (Gemma 3: 6); 0 = every layer uses "
                            "the window.", shapes_params=False)
  local_rope_theta: float = field(0.0, "RoPE base of sliding-window layers, which then skip "
                                  "rope_scaling (Gemma 3: 10000); 0 = rope_theta and "
                                  "rope_scaling, like the global layers.")
  final_logit_softcap: float = field(0.0, "logits = cap * tanh(logits / cap); 0 = off.",
                                     shapes_params=False)
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
    check_choice("mlp_activation", self.mlp_activation, ACTIVATIONS)
    check_dtype_names(self)
    for name in ("sliding_window", "global_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"model.{name}={getattr(self, name)} must be >= 0 (0 = off).")
    for name in ("query_pre_attn_scalar", "local_rope_theta", "final_logit_softcap"):
      if getattr(self, name) < 0:
        raise ValueError(f"model.{name}={getattr(self, name)} must be >= 0 (0 = off).")
    if self.global_every and not self.sliding_window:
      raise ValueError(f"model.global_every={self.global_every} interleaves local and global "
                       "layers, but model.sliding_window=0: set the window or global_every=0.")
    if self.scan_layers and self.global_every and self.global_every <= self.num_layers:
      raise ValueError(f"model.scan_layers=True needs identical layers, but "
                       f"model.global_every={self.global_every} interleaves local and global "
                       "ones: set model.scan_layers=False.")
    variant = dict(sliding_window=self.sliding_window, qk_norm=self.qk_norm,
                   query_pre_attn_scalar=self.query_pre_attn_scalar,
                   rope_scaling=self.rope_scaling.kind != "none")
    if self.attention == "nsa" and any(variant.values()):
      used = [name for name, on in variant.items() if on]
      raise ValueError(f"model.attention='nsa' does not implement model.{used[0]}: unset it "
                       "or use attention='full'.")

  def layer_is_local(self, index: int) -> bool:
    """Whether layer `index` (0-based) uses the sliding window."""
    if not self.sliding_window:
      return False
    return not (self.global_every and (index + 1) % self.global_every == 0)

  def layer_rope(self, index: int) -> tuple[float, RopeScaling | None]:
    """(RoPE base, scaling) of layer `index`."""
    if self.local_rope_theta and self.layer_is_local(index):
      return self.local_rope_theta, None
    return self.rope_theta, self.rope_scaling.scaling()

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
    12·h·d per key a query sees, t/2 keys on average (half of full attention's
    12·L·h·d·t); a sliding-window layer sees at most sliding_window keys."""
    keys = sum(min(seq_len / 2, self.sliding_window) if self.layer_is_local(i) else seq_len / 2
               for i in range(self.num_layers))
    return 12.0 * self.num_heads * self.head_dim * keys

  def train_flops_per_token(self, seq_len: int) -> float:
    """6 · N_matmul + 6 · L · h · d · t (PaLM appendix B, causal attention)."""
    return 6.0 * self.matmul_params() + self.attention_flops_per_token(seq_len)
