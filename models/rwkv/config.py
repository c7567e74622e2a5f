"""`config.model` of the RWKV-7 family ('rwkv'): fields, defaults, checks, FLOPs.

The defaults are the tiny CPU model of configs/rwkv_tiny.py; configs/rwkv.py
sets the published RWKV-7 "Goose" shapes. Shapes: see layers/__init__.py.
"""

import dataclasses
import math
from typing import ClassVar

from layers.rwkv.wkv7 import resolve_impl as resolve_rwkv_impl
from models.config_schema import ModelConfig, field
from models.llama.config import REMAT_POLICIES, check_choice, check_dtype_names


def low_rank_sizes(embed_dim: int) -> dict[str, int]:
  """RWKV-7's published low-rank widths for width e (multiples of 32, at least 32):
  decay and iclr ≈ 1.8·√e, value residual ≈ 1.3·√e, gate ≈ 0.6·e^0.8."""
  rank = lambda x: max(32, int(round(x / 32)) * 32)  # noqa: E731
  root = math.sqrt(embed_dim)
  return dict(decay_rank=rank(1.8 * root), iclr_rank=rank(1.8 * root),
              value_rank=rank(1.3 * root), gate_rank=rank(0.6 * embed_dim ** 0.8))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RwkvConfig(ModelConfig):
  """A stack of RWKV-7 blocks (time mix + channel mix, LayerNorms), ln0 on the embedding."""
  family: ClassVar[str] = "rwkv"

  vocab_size: int = field(512, "Embedding rows; must be >= the tokenizer's vocabulary.")
  embed_dim: int = field(128, "Residual stream width (e); a multiple of head_size.")
  num_layers: int = field(4, "RWKV-7 blocks (L).")
  head_size: int = field(32, "Per-head width (d); heads h = embed_dim / head_size (64 published).")
  hidden_dim: int = field(512, "Channel-mix hidden width (m; 4·e published).")
  decay_rank: int = field(32, "Low-rank width of the decay w (w1, w2).")
  iclr_rank: int = field(32, "Low-rank width of the in-context learning rate a (a1, a2).")
  value_rank: int = field(32, "Low-rank width of the value-residual mix (v1, v2).")
  gate_rank: int = field(64, "Low-rank width of the output gate (g1, g2).")
  chunk_size: int = field(16, "WKV-7 chunk length of the matrix form (computation only); 0 "
                          "runs the sequential token-by-token scan.", shapes_params=False)
  rwkv_impl: str = field("auto", "WKV-7 implementation: xla (jnp chunked form) | pallas "
                         "(pallas_kernels.wkv7; head_size 32 or 64, chunk_size 16, 32 or 64) | "
                         "auto (pallas on a GPU/TPU chip it serves, else xla).",
                         shapes_params=False)
  rwkv_chip: str = field("", "WKV-7 kernel target (h100, tpu_v5e, ...); '' = this machine's.",
                         shapes_params=False)
  max_seq_len: int = field(256, "Longest row of data and of prompt + sampled tokens (the "
                           "recurrent state itself has no length limit).", shapes_params=False)
  norm_eps: float = field(1e-5, "LayerNorm epsilon (ln0, ln1, ln2, ln_out; ln_x uses 64e-5).")
  scan_layers: bool = field(True, "nn.scan over blocks 1..L-1 (block 0 makes v_first).")
  remat_policy: str = field("none", "none | full | dots_saveable | "
                            "dots_with_no_batch_dims_saveable.", shapes_params=False)
  dtype: str = field("bfloat16", "Computation dtype (decay, gates and WKV state stay float32).",
                     shapes_params=False)
  param_dtype: str = field("float32", "Parameter storage dtype.")

  def __post_init__(self):
    for name in ("vocab_size", "embed_dim", "num_layers", "head_size", "hidden_dim",
                 "decay_rank", "iclr_rank", "value_rank", "gate_rank", "max_seq_len"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"model.{name}={getattr(self, name)} must be positive.")
    if self.chunk_size < 0:
      raise ValueError(f"model.chunk_size={self.chunk_size} must be >= 0 (0: sequential scan).")
    if self.embed_dim % self.head_size:
      raise ValueError(f"model.embed_dim={self.embed_dim} must be a multiple of "
                       f"model.head_size={self.head_size}.")
    if self.norm_eps <= 0:
      raise ValueError(f"model.norm_eps={self.norm_eps} must be positive.")
    check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
    check_dtype_names(self)
    # Raises for an unknown name, or 'pallas' with a head size / chunk it cannot serve.
    resolve_rwkv_impl(self.rwkv_impl, chip=self.rwkv_chip, head_size=self.head_size,
                      chunk_size=self.chunk_size)

  def on_chip(self, chip):
    return self if self.rwkv_chip else dataclasses.replace(self, rwkv_chip=chip)

  @property
  def num_heads(self) -> int:
    """h = e / d."""
    return self.embed_dim // self.head_size

  def sharded_sizes(self):
    return {"num_heads": ("heads", self.num_heads), "hidden_dim": ("mlp", self.hidden_dim)}

  def matmul_params(self) -> int:
    """Weights each token multiplies with (projections, low-rank maps, head; not the
    embedding lookup)."""
    e = self.embed_dim
    low_rank = 2 * e * (self.decay_rank + self.iclr_rank + self.value_rank + self.gate_rank)
    per_layer = 4 * e * e + low_rank + 2 * e * self.hidden_dim
    return self.num_layers * per_layer + e * self.vocab_size

  def wkv_flops_per_token(self, seq_len: int) -> float:
    """Forward + backward FLOPs of the WKV-7 per token. Chunked (B tokens): four
    [B, B] pair matrices over d channels (A_k, A_b, and r's two), their products with
    V and U, and the state's read-outs and update, ~(8·B + 10·d)·d per head
    forward; sequential: ~8·d² per head (read S·a, S·r; write decay, removal, v kᵀ)."""
    h, d = self.num_heads, self.head_size
    chunk = min(self.chunk_size, seq_len)
    per_head = (8 * chunk + 10 * d) * d if chunk > 0 else 8 * d * d
    return 3.0 * self.num_layers * h * per_head

  def train_flops_per_token(self, seq_len: int) -> float:
    """6 · N_matmul + the WKV recurrence's own multiply-adds."""
    return 6.0 * self.matmul_params() + self.wkv_flops_per_token(seq_len)
