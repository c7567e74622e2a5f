"""Llama-style decoder: RMSNorm, GQA attention with RoPE, SwiGLU, optional tied head.

The Qwen2/3, Mistral and Gemma 3 variants are LlamaConfig settings: q/k/v
biases, q/k norms, sliding-window and interleaved local/global layers, GeGLU,
(1 + w) norms, post-norms, scaled embeddings and logit soft-capping.

Shapes (layers/__init__.py): b batch, t sequence, e embed, v vocab, L layers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.attention import Attention, NativeSparseAttention
from layers.embedding import Embed
from layers.linear import Einsum
from layers.mlp import SwiGLU
from layers.norms import RMSNorm
from models.llama.config import REMAT_POLICIES, LlamaConfig

def _dtypes(config: LlamaConfig) -> dict:
  return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


class Block(nn.Module):
  """One pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)).

  With config.post_norms (Gemma) each branch output is normed again before
  its residual add: x + post_attn_norm(attn(attn_norm(x))), likewise with
  post_mlp_norm. Subclasses (the MoE block) swap the feed-forward by
  overriding `feed_forward`.

  Attributes:
    config: the model shape.
    decode: use and update the attention KV cache.
    layer_index: this block's depth (0-based), which picks a sliding window or
      global attention when config.global_every interleaves them; scanned
      blocks are identical and leave it at 0.
  """
  config: LlamaConfig
  decode: bool = False
  layer_index: int = 0

  def norm(self, name: str) -> nn.Module:
    cfg = self.config
    return RMSNorm(cfg.norm_eps, scale_plus_one=cfg.norm_plus_one, name=name, **_dtypes(cfg))

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    """x [b, t, e] -> ([b, t, e], None); the None makes it an nn.scan body."""
    cfg = self.config
    y = self.norm("attn_norm")(x)
    y = self.attention()(y, positions, segment_ids, self.decode)
    if cfg.post_norms:
      y = self.norm("post_attn_norm")(y)
    x = nn.with_logical_constraint(x + y, ("batch", "length", "act_embed"))
    y = self.norm("mlp_norm")(x)
    y = self.feed_forward(y, segment_ids)
    if cfg.post_norms:
      y = self.norm("post_mlp_norm")(y)
    x = nn.with_logical_constraint(x + y, ("batch", "length", "act_embed"))
    return x, None

  def attention(self) -> nn.Module:
    """The block's attention layer, named 'attn': dense causal or Native Sparse."""
    cfg = self.config
    kw = dict(attention_impl=cfg.attention_impl, attention_chip=cfg.attention_chip,
              name="attn", **_dtypes(cfg))
    if cfg.attention == "nsa":
      nsa = cfg.nsa
      return NativeSparseAttention(
          cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta,
          compress_block=nsa.compress_block, compress_stride=nsa.compress_stride,
          select_block=nsa.select_block, select_top_n=nsa.select_top_n,
          window=nsa.window, **kw)
    theta, scaling = cfg.layer_rope(self.layer_index)
    window = cfg.sliding_window if cfg.layer_is_local(self.layer_index) else 0
    return Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, theta,
                     rope_scaling=scaling, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
                     norm_eps=cfg.norm_eps, norm_plus_one=cfg.norm_plus_one,
                     query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=window,
                     **kw)

  def feed_forward(self, y: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """The block's MLP on normed activations [b, t, e] -> [b, t, e]."""
    del segment_ids  # A dense MLP treats every token alike.
    return SwiGLU(self.config.mlp_dim, self.config.mlp_activation, name="mlp",
                  **_dtypes(self.config))(y)


def stack_blocks(block: type[nn.Module], config, decode: bool, x, positions, segment_ids, *,
                 count: int, first_index: int, scan_name: str, index_field: str | None = None,
                 **block_fields):
  """Applies `count` blocks in sequence: one nn.scan named `scan_name` when
  `config.scan_layers`, else modules named layers_{first_index + i}.

  `index_field` names the block field that receives each unrolled block's depth
  (first_index + i), for blocks that differ by depth (Gemma's local and global
  layers); scanned blocks are identical and keep the field's default.

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
    depth = {index_field: first_index + i} if index_field else {}
    x, _ = block(config, decode, name=f"layers_{first_index + i}", **depth,
                 **block_fields)(x, positions, segment_ids)
  return x


class Llama(nn.Module):
  """Decoder-only Llama language model.

  Parameters: embed/embedding [v, e]; layers/... (stacked with a leading
  'layers' axis when scan_layers, else layers_0 ... layers_{L-1});
  final_norm/scale [e]; lm_head/kernel [e, v] unless tie_embeddings. With
  embed_scale the looked-up embeddings are multiplied by sqrt(e); with
  final_logit_softcap the logits are cap * tanh(logits / cap).

  Attributes:
    config: the model shape.
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, decode: bool = False,
               last_logits_only: bool = False) -> jax.Array:
    """tokens int [b, t] -> float32 logits [b, t, v] ([b, 1, v] with last_logits_only).

    Args:
      tokens: int token ids [b, t].
      positions: int [b, t] RoPE positions; default arange(t) (cache_index +
        arange(t) when decoding).
      segment_ids: int [b, t]; tokens attend causally within the same nonzero
        segment, 0 marks padding. None means one segment per row.
      decode: read and write the 'cache' collection (see `init_cache`).
      last_logits_only: logits of the last position only, [b, 1, v] (a sampler's
        prefill: the [e, v] head runs on one token per row instead of t).
    """
    cfg = self.config
    kw = _dtypes(cfg)
    embed = Embed(cfg.vocab_size, cfg.embed_dim, name="embed", **kw)
    x = embed(tokens)
    if cfg.embed_scale:
      x = x * jnp.asarray(cfg.embed_dim ** 0.5, x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    if positions is None and not decode:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

    x = self.decoder_layers(x, positions, segment_ids, decode)
    if last_logits_only:
      x = x[:, -1:]
    x = RMSNorm(cfg.norm_eps, scale_plus_one=cfg.norm_plus_one, name="final_norm", **kw)(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Einsum((cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), "bte,ev->btv",
                      name="lm_head", **kw)(x)
    logits = logits.astype(jnp.float32)
    if cfg.final_logit_softcap:
      logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
    return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))

  def decoder_layers(self, x, positions, segment_ids, decode: bool):
    """The L blocks between embedding and final norm (overridden by the MoE model)."""
    return stack_blocks(Block, self.config, decode, x, positions, segment_ids,
                        count=self.config.num_layers, first_index=0, scan_name="layers",
                        index_field="layer_index")


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, *,
               model_class: type[nn.Module] = Llama):
  """A zero KV cache for `batch_size` rows of up to `max_length` tokens.

  `model_class` is the decoder built from `config` (Llama, or a subclass such
  as models.moe.Moe).

  Returns the 'cache' collection pytree (leaves are nn.Partitioned boxes with
  logical axes; `nn.get_partition_spec` gives their specs, `nn.unbox` plain
  arrays, and `apply` accepts either). Per layer: cached_key / cached_value
  [b, s, k, d] in `config.dtype`, cached_segment_ids [b, s] and cache_index
  [], where s = max_length, or min(max_length, sliding_window) in
  sliding-window layers (a rolling cache); stacked with a leading [L] axis
  when scan_layers.
  Callers keep prompt + generated tokens <= max_length.
  """
  model = model_class(config)
  tokens = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
