"""Jamba-style hybrid stacks: Llama decoder blocks among the Mamba-2 blocks.

`model.attention_layers` lists the depths (0-based, increasing) whose block is
the Llama decoder block (models/llama/model.py `Block`: RMSNorm, GQA attention
with RoPE, RMSNorm, SwiGLU), shaped by `model.attention.*`; every other depth
is a Mamba block. Both kinds see the same segment ids (packed documents);
the attention blocks also take RoPE positions, which restart at 0 in each
document when the caller gives none.

Parameter (and decode-cache) names, stable for a given config:
  scan_layers=False  layers_0 ... layers_{L-1}: a Mamba block {norm, mixer} or an
                     attention block {attn_norm, attn, mlp_norm, mlp}.
  scan_layers=True   an attention block at depth i is layers_i; each maximal run
                     of Mamba blocks at depths a..c is one nn.scan named
                     layers_a_c, stacked along a leading [c - a + 1] 'layers'
                     axis (a run of one block too).
A pure Mamba model (attention_layers=()) keeps its single scan named 'layers'.

Decoding keeps both caches in the 'cache' collection under those names: the
Mamba blocks' conv windows and SSM states, the attention blocks' KV caches
(cached_key / cached_value [b, s, k, d], cached_segment_ids [b, s],
cache_index []).

Shapes (layers/__init__.py): b batch, t sequence, e embed, s cache length,
k kv heads, d head dim, L layers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.llama.config import LlamaConfig
from models.llama.model import Block as AttentionBlock
from models.llama.model import stack_blocks
from models.mamba.config import MambaConfig


def attention_block_config(config: MambaConfig) -> LlamaConfig:
  """The LlamaConfig whose `Block` is the hybrid's attention block: `model.attention.*`
  for the attention and MLP; width, norm epsilon, dtypes, remat and the attention
  implementation from the Mamba config; never scanned (each block stands alone)."""
  a = config.attention
  return LlamaConfig(
      vocab_size=config.vocab_size, embed_dim=config.embed_dim,
      num_layers=max(1, len(config.attention_layers)), num_heads=a.num_heads,
      num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, mlp_dim=a.mlp_dim,
      max_seq_len=config.max_seq_len, rope_theta=a.rope_theta, norm_eps=config.norm_eps,
      attention_impl=config.attention_impl, attention_chip=config.attention_chip,
      scan_layers=False, remat_policy=config.remat_policy, dtype=config.dtype,
      param_dtype=config.param_dtype)


def mamba_runs(config: MambaConfig) -> list[tuple[int, int]]:
  """(first, last) depths of each maximal run of consecutive Mamba blocks, in order."""
  runs, first = [], 0
  for depth in (*config.attention_layers, config.num_layers):
    if depth > first:
      runs.append((first, depth - 1))
    first = depth + 1
  return runs


def document_positions(segment_ids: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
  """int32 [b, t]: each token's offset from the first token of its document.

  A document starts where the segment id changes (and at t = 0); None means
  one document per row, i.e. arange(t).
  """
  index = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
  if segment_ids is None:
    return index
  segment_ids = segment_ids.astype(jnp.int32)
  starts = jnp.concatenate([jnp.ones((shape[0], 1), bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def hybrid_layers(config: MambaConfig, mamba_block: type[nn.Module], decode: bool, x,
                  positions, segment_ids):
  """Applies the L blocks of a hybrid to x [b, t, e] -> [b, t, e].

  Must be called from a compact method (the blocks become its submodules; names
  in the module docstring). `mamba_block` is the family's Mamba block class,
  built as `mamba_block(config, decode)`. `positions` None (outside decoding)
  become `document_positions(segment_ids)`; while decoding the attention blocks
  count them from their cache index.
  """
  if positions is None and not decode:
    positions = document_positions(segment_ids, x.shape[:2])
  attention_config = attention_block_config(config)
  runs = {first: last for first, last in mamba_runs(config)}
  depth = 0
  while depth < config.num_layers:
    if depth in runs:
      last = runs[depth]
      x = stack_blocks(mamba_block, config, decode, x, positions, segment_ids,
                       count=last - depth + 1, first_index=depth,
                       scan_name=f"layers_{depth}_{last}")
      depth = last + 1
    else:
      x = stack_blocks(AttentionBlock, attention_config, decode, x, positions, segment_ids,
                       count=1, first_index=depth, scan_name=f"layers_{depth}")
      depth += 1
  return x
