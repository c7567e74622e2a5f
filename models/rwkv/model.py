"""RWKV-7 "Goose" language model: embedding + ln0, RWKV-7 blocks, ln_out, head.

Block 0 makes the values every later block mixes in (the value residual,
v_first), so it is built on its own ('layers_0'); blocks 1..L-1 are identical
and scanned ('layers', or layers_1 ... unrolled). The carry between blocks is
(x, v_first, depth): the block's index l rides along as a traced int32 so that
scanned blocks, which share one module, still get their own depth-dependent
initial values (layers/rwkv/initializers.py); it sets nothing else.

Shapes (layers/__init__.py): b batch, t sequence, e embed, v vocab, h heads,
d head size, L layers.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.embedding import Embed
from layers.linear import Einsum
from layers.norms import LayerNorm
from layers.rwkv import ChannelMix, TimeMix
from layers.rwkv import initializers as rwkv_init
from layers.ssm import document_index
from models.llama.config import REMAT_POLICIES
from models.llama.model import stack_blocks
from models.rwkv.config import RwkvConfig

_RESIDUAL_AXES = ("batch", "length", "act_embed")


def _dtypes(config: RwkvConfig) -> dict:
  return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


class _Cache(NamedTuple):
  """The 'cache' collection variables of one block (a recurrent state, no length axis)."""
  att_shift: nn.Variable  # [b, e] the time mix's last normed input
  att_state: nn.Variable  # float32 [b, h, d, d] the WKV state after the last token
  ffn_shift: nn.Variable  # [b, e] the channel mix's last normed input
  segment_ids: nn.Variable  # int32 [b] the last token's segment id


class Block(nn.Module):
  """x + time_mix(ln1(x)), then x + channel_mix(ln2(x)).

  Attributes:
    config: the model shape.
    decode: continue from and update the block's recurrent cache.
    first: block 0 (no value residual; its values become v_first).
  """
  config: RwkvConfig
  decode: bool = False
  first: bool = False

  @nn.compact
  def __call__(self, carry, positions, segment_ids):
    """carry (x [b, t, e], v_first [b, t, h, d] or None, depth int32 []) -> (carry with
    depth + 1, None); positions are unused (order comes from the recurrence); the None
    makes it an nn.scan body."""
    del positions
    cfg = self.config
    kw = _dtypes(cfg)
    x, v_first, depth = carry
    b, t, _ = x.shape
    cache = self._cache_variables(b) if self.decode else None
    previous = None if cache is None else cache.segment_ids.value
    doc = None if segment_ids is None and cache is None else document_index(
        segment_ids, (b, t), previous)

    y = LayerNorm(cfg.norm_eps, name="ln1", **kw)(x)
    y, values, att_last, state = TimeMix(
        cfg.num_heads, cfg.head_size, cfg.decay_rank, cfg.iclr_rank, cfg.value_rank,
        cfg.gate_rank, chunk_size=cfg.chunk_size, rwkv_impl=cfg.rwkv_impl,
        rwkv_chip=cfg.rwkv_chip, value_residual=not self.first, num_layers=cfg.num_layers,
        name="att", **kw)(
            y, v_first, doc, None if cache is None else cache.att_shift.value,
            None if cache is None else cache.att_state.value, depth=depth)
    x = nn.with_logical_constraint(x + y, _RESIDUAL_AXES)
    y = LayerNorm(cfg.norm_eps, name="ln2", **kw)(x)
    y, ffn_last = ChannelMix(cfg.hidden_dim, cfg.num_layers, name="ffn", **kw)(
        y, doc, None if cache is None else cache.ffn_shift.value, depth=depth)
    x = nn.with_logical_constraint(x + y, _RESIDUAL_AXES)

    if cache is not None:
      cache.att_shift.value = att_last.astype(cache.att_shift.value.dtype)
      cache.att_state.value = state
      cache.ffn_shift.value = ffn_last.astype(cache.ffn_shift.value.dtype)
      if segment_ids is not None:
        cache.segment_ids.value = segment_ids[:, -1].astype(jnp.int32)
    if self.first:
      v_first = values
    return (x, v_first, depth + 1), None

  def _cache_variables(self, b: int) -> _Cache:
    """The cache variables, created as zeros if absent."""
    cfg = self.config
    e, h, d = cfg.embed_dim, cfg.num_heads, cfg.head_size
    var = lambda name, axes, shape, dtype: self.variable(  # noqa: E731
        "cache", name, nn.with_logical_partitioning(jnp.zeros, axes), shape, dtype)
    return _Cache(
        att_shift=var("att_shift", ("batch", "act_embed"), (b, e), jnp.dtype(cfg.dtype)),
        att_state=var("att_state", ("batch", "heads", "head_dim", "state_dim"), (b, h, d, d),
                      jnp.float32),
        ffn_shift=var("ffn_shift", ("batch", "act_embed"), (b, e), jnp.dtype(cfg.dtype)),
        segment_ids=var("segment_ids", ("batch",), (b,), jnp.int32))


class Rwkv(nn.Module):
  """Decoder-only RWKV-7 language model.

  Parameters: embed/embedding [v, e]; ln0/{scale, bias} [e]; layers_0/{ln1, att,
  ln2, ffn}; layers/... for blocks 1..L-1 (stacked with a leading 'layers' axis
  when scan_layers, else layers_1 ... layers_{L-1}); ln_out/{scale, bias} [e];
  head/kernel [e, v].

  Attributes:
    config: the model shape.
  """
  config: RwkvConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, decode: bool = False,
               last_logits_only: bool = False) -> jax.Array:
    """tokens int [b, t] -> float32 logits [b, t, v] ([b, 1, v] with last_logits_only).

    Args:
      tokens: int token ids [b, t].
      positions: accepted for the shared LM interface; unused.
      segment_ids: int [b, t]; the state and the token shift restart where the id
        changes (packed documents; 0 on left padding). None: one document per row.
      decode: continue from and update the 'cache' collection (see `init_cache`).
      last_logits_only: logits of the last position only, [b, 1, v] (a sampler's
        prefill: the [e, v] head runs on one token per row instead of t).
    """
    cfg = self.config
    kw = _dtypes(cfg)
    x = Embed(cfg.vocab_size, cfg.embed_dim, name="embed",
              embedding_init=rwkv_init.small_uniform, **kw)(tokens)
    x = nn.with_logical_constraint(LayerNorm(cfg.norm_eps, name="ln0", **kw)(x), _RESIDUAL_AXES)
    first = Block
    if cfg.remat_policy != "none":
      first = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy])
    carry = (x, None, jnp.zeros((), jnp.int32))
    carry, _ = first(cfg, decode, True, name="layers_0")(carry, positions, segment_ids)
    if cfg.num_layers > 1:
      carry = stack_blocks(Block, cfg, decode, carry, positions, segment_ids,
                           count=cfg.num_layers - 1, first_index=1, scan_name="layers")
    x = carry[0][:, -1:] if last_logits_only else carry[0]
    x = LayerNorm(cfg.norm_eps, name="ln_out", **kw)(x)
    logits = Einsum((cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), "bte,ev->btv",
                    name="head", kernel_init=rwkv_init.orthogonal(
                        rwkv_init.head_gain(cfg.vocab_size, cfg.embed_dim)), **kw)(x)
    logits = logits.astype(jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))


def init_cache(config: RwkvConfig, batch_size: int, max_length: int):
  """A zero recurrent cache for `batch_size` rows.

  Its size does not depend on `max_length` (kept for the shared sampler's
  signature). Per block: att_shift and ffn_shift [b, e] in `config.dtype`,
  att_state float32 [b, h, d, d], segment_ids int32 [b]; blocks 1..L-1 stacked
  with a leading [L-1] axis when scan_layers. Leaves are nn.Partitioned boxes
  with logical axes.
  """
  del max_length
  model = Rwkv(config)
  tokens = jnp.zeros((batch_size, 1), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
