"""Mamba language model: embedding, pre-norm residual Mamba-1 or Mamba-2 blocks, RMSNorm, LM head.

With `model.attention_layers` some depths hold Llama decoder blocks instead
(a Jamba-style hybrid; models/mamba/hybrid.py builds that stack).

Shapes (layers/__init__.py): b batch, t sequence, e embed, v vocab, L layers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.embedding import Embed
from layers.linear import Einsum
from layers.norms import RMSNorm
from layers.ssm import Mamba1Mixer, Mamba2Mixer
from models.llama.model import stack_blocks
from models.mamba import hybrid
from models.mamba.config import MambaConfig

_RESIDUAL_AXES = ("batch", "length", "act_embed")


def _dtypes(config: MambaConfig) -> dict:
  return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


class Block(nn.Module):
  """x + mixer(norm(x)); the mixer is Mamba-1's or Mamba-2's by `config.version`.

  Attributes:
    config: the model shape.
    decode: continue from and update the mixer's recurrent cache.
  """
  config: MambaConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    """x [b, t, e] -> ([b, t, e], None); positions are unused (no RoPE); the None
    makes it an nn.scan body."""
    del positions
    cfg = self.config
    y = RMSNorm(cfg.norm_eps, name="norm", **_dtypes(cfg))(x)
    if cfg.version == 1:
      y = Mamba1Mixer(cfg.embed_dim, cfg.inner_dim, cfg.state_size, cfg.dt_rank,
                      conv_kernel=cfg.conv_kernel, use_bias=cfg.use_bias,
                      use_conv_bias=cfg.use_conv_bias, chunk_size=cfg.chunk_size,
                      name="mixer", **_dtypes(cfg))(y, segment_ids, self.decode)
      return nn.with_logical_constraint(x + y, _RESIDUAL_AXES), None
    y = Mamba2Mixer(cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.state_size,
                    num_groups=cfg.num_groups, conv_kernel=cfg.conv_kernel,
                    chunk_size=cfg.chunk_size, time_step_limit=tuple(cfg.time_step_limit),
                    norm_eps=cfg.norm_eps, ssm_impl=cfg.ssm_impl, ssm_chip=cfg.ssm_chip,
                    name="mixer", **_dtypes(cfg))(
                        y, segment_ids, self.decode)
    return nn.with_logical_constraint(x + y, _RESIDUAL_AXES), None


class Mamba(nn.Module):
  """Decoder-only Mamba (Mamba-1 or Mamba-2 blocks) language model.

  Parameters: embed/embedding [v, e]; layers/{norm, mixer} (stacked with a
  leading 'layers' axis when scan_layers, else layers_0 ... layers_{L-1});
  final_norm/scale [e]; lm_head/kernel [e, v] unless tie_embeddings. A hybrid
  (attention_layers) names its blocks as models/mamba/hybrid.py lists.

  Attributes:
    config: the model shape.
  """
  config: MambaConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, decode: bool = False,
               last_logits_only: bool = False) -> jax.Array:
    """tokens int [b, t] -> float32 logits [b, t, v] ([b, 1, v] with last_logits_only).

    Args:
      tokens: int token ids [b, t].
      positions: int [b, t] RoPE positions of a hybrid's attention blocks (default:
        the offset in each document; cache_index + arange(t) when decoding);
        pure Mamba ignores them (order comes from the scan).
      segment_ids: int [b, t]; the state restarts where the id changes (packed
        documents; 0 on left padding). None means one document per row.
      decode: continue from and update the 'cache' collection (see `init_cache`).
      last_logits_only: logits of the last position only, [b, 1, v] (a sampler's
        prefill: the [e, v] head runs on one token per row instead of t).
    """
    cfg = self.config
    kw = _dtypes(cfg)
    embed = Embed(cfg.vocab_size, cfg.embed_dim, name="embed", **kw)
    x = nn.with_logical_constraint(embed(tokens), _RESIDUAL_AXES)
    if cfg.attention_layers:
      x = hybrid.hybrid_layers(cfg, Block, decode, x, positions, segment_ids)
    else:
      x = stack_blocks(Block, cfg, decode, x, positions, segment_ids, count=cfg.num_layers,
                       first_index=0, scan_name="layers")
    if last_logits_only:
      x = x[:, -1:]
    x = RMSNorm(cfg.norm_eps, name="final_norm", **kw)(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Einsum((cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), "bte,ev->btv",
                      name="lm_head", **kw)(x)
    logits = logits.astype(jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))


def init_cache(config: MambaConfig, batch_size: int, max_length: int):
  """A zero recurrent cache for `batch_size` rows.

  The recurrent part's size does not depend on `max_length`. Per Mamba layer,
  version 2: conv_x_window [b, w-1, h, d], conv_b_window / conv_c_window
  [b, w-1, ng, N] in `config.dtype`, ssm_state float32 [b, h, d, N]; version 1:
  conv_window [b, w-1, i], ssm_state float32 [b, i, N]; both: segment_ids int32 [b];
  stacked with a leading [L] axis when scanned. A hybrid's attention blocks add a
  KV cache of `max_length` tokens each (layers/attention/dense.py: cached_key /
  cached_value [b, s, k, d], cached_segment_ids [b, s], cache_index []); callers
  keep prompt + generated tokens <= max_length. Leaves are nn.Partitioned boxes
  with logical axes.
  """
  model = Mamba(config)
  tokens = jnp.zeros((batch_size, max_length if config.attention_layers else 1), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
