"""Llama-style decoder: RMSNorm, GQA attention with RoPE, SwiGLU, optional tied head.

Shapes: b batch, t sequence, e embed, v vocab, L layers.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.attention import IMPLEMENTATIONS, Attention, NativeSparseAttention
from layers.embedding import Embed
from layers.linear import Einsum
from layers.mlp import SwiGLU
from layers.norms import RMSNorm

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


ATTENTIONS = ("full", "nsa")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The `config.model` fields (see configs/base.py) that shape a Llama.

  Attributes:
    vocab_size, embed_dim, num_layers, num_heads, num_kv_heads, head_dim, mlp_dim,
    max_seq_len, rope_theta, norm_eps, tie_embeddings, attention_impl, scan_layers,
    remat_policy, qkv_bias, attention, nsa_*, attention_chip: as documented in
    configs/base.py.
    dtype, param_dtype: dtype names such as 'bfloat16', 'float32'.
  """
  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_seq_len: int
  rope_theta: float
  norm_eps: float
  tie_embeddings: bool
  attention_impl: str
  scan_layers: bool
  remat_policy: str
  dtype: str
  param_dtype: str
  qkv_bias: bool = False
  attention: str = "full"
  nsa_compress_block: int = 32
  nsa_compress_stride: int = 16
  nsa_select_block: int = 64
  nsa_select_top_n: int = 16
  nsa_window: int = 512
  attention_chip: str = ""

  def __post_init__(self):
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "max_seq_len"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"model.{name}={getattr(self, name)} must be positive.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads} (grouped-query attention).")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE.")
    if self.attention_impl not in IMPLEMENTATIONS:
      raise ValueError(f"model.attention_impl={self.attention_impl!r}; choose one of "
                       f"{IMPLEMENTATIONS}.")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"model.attention={self.attention!r}; choose one of {ATTENTIONS}.")
    if self.attention == "nsa" and self.attention_impl == "cudnn":
      raise ValueError("model.attention='nsa' has no cuDNN path: set model.attention_impl to "
                       "'auto', 'xla' or 'pallas'.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy={self.remat_policy!r}; choose one of "
                       f"{tuple(REMAT_POLICIES)}.")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not a dtype name "
                         "(e.g. 'bfloat16', 'float32').") from e

  @classmethod
  def from_config_dict(cls, model_cfg) -> "LlamaConfig":
    """Builds and validates from `config.model` (a ConfigDict or dict; `family` ignored).

    Raises:
      ValueError: naming the `model.<field>` that is missing or invalid.
    """
    values = {}
    for field in dataclasses.fields(cls):
      if field.name not in model_cfg:
        if field.default is not dataclasses.MISSING:
          continue
        raise ValueError(f"model.{field.name} is missing from the config.")
      values[field.name] = model_cfg[field.name]
    return cls(**values)


def _dtypes(config: LlamaConfig) -> dict:
  return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


class Block(nn.Module):
  """One pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)).

  Subclasses (the MoE block) swap the feed-forward by overriding `feed_forward`.

  Attributes:
    config: the model shape.
    decode: use and update the attention KV cache.
  """
  config: LlamaConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    """x [b, t, e] -> ([b, t, e], None); the None makes it an nn.scan body."""
    cfg = self.config
    kw = _dtypes(cfg)
    y = RMSNorm(cfg.norm_eps, name="attn_norm", **kw)(x)
    y = self.attention()(y, positions, segment_ids, self.decode)
    x = nn.with_logical_constraint(x + y, ("batch", "length", "act_embed"))
    y = RMSNorm(cfg.norm_eps, name="mlp_norm", **kw)(x)
    y = self.feed_forward(y, segment_ids)
    x = nn.with_logical_constraint(x + y, ("batch", "length", "act_embed"))
    return x, None

  def attention(self) -> nn.Module:
    """The block's attention layer, named 'attn': dense causal or Native Sparse."""
    cfg = self.config
    kw = dict(attention_impl=cfg.attention_impl, attention_chip=cfg.attention_chip,
              name="attn", **_dtypes(cfg))
    if cfg.attention == "nsa":
      if cfg.qkv_bias:
        raise ValueError("model.qkv_bias=True is not supported with model.attention='nsa'.")
      return NativeSparseAttention(
          cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta,
          compress_block=cfg.nsa_compress_block, compress_stride=cfg.nsa_compress_stride,
          select_block=cfg.nsa_select_block, select_top_n=cfg.nsa_select_top_n,
          window=cfg.nsa_window, **kw)
    return Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta,
                     qkv_bias=cfg.qkv_bias, **kw)

  def feed_forward(self, y: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """The block's MLP on normed activations [b, t, e] -> [b, t, e]."""
    del segment_ids  # A dense MLP treats every token alike.
    return SwiGLU(self.config.mlp_dim, name="mlp", **_dtypes(self.config))(y)


def stack_blocks(block: type[nn.Module], config, decode: bool, x, positions, segment_ids, *,
                 count: int, first_index: int, scan_name: str, **block_fields):
  """Applies `count` blocks in sequence: one nn.scan named `scan_name` when
  `config.scan_layers`, else modules named layers_{first_index + i}.

  Must be called from a compact method (the blocks become its submodules).
  Every variable collection is stacked along a leading 'layers' axis when scanned.
  """
  if config.remat_policy != "none":
    block = nn.remat(block, policy=REMAT_POLICIES[config.remat_policy],
                     prevent_cse=not config.scan_layers)
  if config.scan_layers:
    stack = nn.scan(block, variable_axes={True: 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast), length=count,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(config, decode, name=scan_name, **block_fields)(x, positions, segment_ids)
    return x
  for i in range(count):
    x, _ = block(config, decode, name=f"layers_{first_index + i}", **block_fields)(
        x, positions, segment_ids)
  return x


class Llama(nn.Module):
  """Decoder-only Llama language model.

  Parameters: embed/embedding [v, e]; layers/... (stacked with a leading
  'layers' axis when scan_layers, else layers_0 ... layers_{L-1});
  final_norm/scale [e]; lm_head/kernel [e, v] unless tie_embeddings.

  Attributes:
    config: the model shape.
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """tokens int [b, t] -> float32 logits [b, t, v].

    Args:
      tokens: int token ids [b, t].
      positions: int [b, t] RoPE positions; default arange(t) (cache_index +
        arange(t) when decoding).
      segment_ids: int [b, t]; tokens attend causally within the same nonzero
        segment, 0 marks padding. None means one segment per row.
      decode: read and write the 'cache' collection (see `init_cache`).
    """
    cfg = self.config
    kw = _dtypes(cfg)
    embed = Embed(cfg.vocab_size, cfg.embed_dim, name="embed", **kw)
    x = nn.with_logical_constraint(embed(tokens), ("batch", "length", "act_embed"))
    if positions is None and not decode:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

    x = self.decoder_layers(x, positions, segment_ids, decode)
    x = RMSNorm(cfg.norm_eps, name="final_norm", **kw)(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Einsum((cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), "bte,ev->btv",
                      name="lm_head", **kw)(x)
    logits = logits.astype(jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))

  def decoder_layers(self, x, positions, segment_ids, decode: bool):
    """The L blocks between embedding and final norm (overridden by the MoE model)."""
    return stack_blocks(Block, self.config, decode, x, positions, segment_ids,
                        count=self.config.num_layers, first_index=0, scan_name="layers")


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, *,
               model_class: type[nn.Module] = Llama):
  """A zero KV cache for `batch_size` rows of up to `max_length` tokens.

  `model_class` is the decoder built from `config` (Llama, or a subclass such
  as models.moe.Moe).

  Returns the 'cache' collection pytree (leaves are nn.Partitioned boxes with
  logical axes; `nn.get_partition_spec` gives their specs, `nn.unbox` plain
  arrays, and `apply` accepts either). Per layer: cached_key / cached_value
  [b, max_length, k, d] in `config.dtype`, cached_segment_ids [b, max_length]
  and cache_index []; stacked with a leading [L] axis when scan_layers.
  Callers keep prompt + generated tokens <= max_length.
  """
  model = model_class(config)
  tokens = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
