"""Mixture-of-Experts decoder: the Llama decoder with routed SwiGLU experts.

Mixtral, Qwen2-MoE and DeepSeek-V3 routing are settings of `MoeConfig`
(models/moe/config.py). Parameters are those of `models.llama.Llama` except that the MoE blocks hold
`moe/...` (see `layers.moe.MoeFeedForward`) instead of `mlp/...`. Blocks are
named layers_0 ... layers_{L-1} when unrolled; with scan_layers the first
`moe.first_dense_layers` are stacked as `dense_layers` and the rest as
`moe_layers`. Besides 'params' the model has a 'balance' collection (each MoE
layer's selection bias [E]) and, when applied with mutable=['moe_stats'],
sows per-layer routing statistics.

Shapes (layers/__init__.py): b batch, t sequence, e embed, E experts, L layers.
"""

import functools
import re

import jax
import jax.numpy as jnp

from models.llama import model as llama
from models.moe.config import MoeConfig

class MoeBlock(llama.Block):
  """A Llama block whose feed-forward is `MoeFeedForward` (named 'moe').

  Padding tokens (segment id 0) are left out of the routing statistics.
  """

  def feed_forward(self, y, segment_ids):
    cfg = self.config
    token_mask = None if segment_ids is None else segment_ids > 0
    return cfg.moe.layer(cfg.dtype, cfg.param_dtype, name="moe")(y, token_mask)


class Moe(llama.Llama):
  """Decoder-only MoE language model (see the module docstring).

  Attributes:
    config: MoeConfig.
  """
  config: MoeConfig

  def decoder_layers(self, x, positions, segment_ids, decode: bool):
    cfg = self.config
    dense = cfg.moe.first_dense_layers
    if dense:
      x = llama.stack_blocks(llama.Block, cfg, decode, x, positions, segment_ids,
                             count=dense, first_index=0, scan_name="dense_layers",
                             index_field="layer_index")
    return llama.stack_blocks(MoeBlock, cfg, decode, x, positions, segment_ids,
                              count=cfg.num_moe_layers, first_index=dense,
                              scan_name="moe_layers", index_field="layer_index")


# A zero KV cache (see `models.llama.model.init_cache`).
init_cache = functools.partial(llama.init_cache, model_class=Moe)


_LAYER_NAME = re.compile(r"layers_(\d+)$")


def _moe_layer_entries(collection: dict) -> list:
  """The per-MoE-layer subtrees of a collection, in layer order.

  Unrolled: [collection['layers_i']['moe'] for each MoE layer i]; scanned:
  [collection['moe_layers']['moe']] whose leaves carry a leading [L_moe] axis.
  """
  if "moe_layers" in collection:
    return [collection["moe_layers"]["moe"]]
  indexed = sorted((int(_LAYER_NAME.match(name).group(1)), sub)
                   for name, sub in collection.items()
                   if _LAYER_NAME.match(name) and "moe" in sub)
  return [sub["moe"] for _, sub in indexed]


def stack_moe_layers(collection: dict) -> dict[str, jax.Array]:
  """A per-layer collection ('moe_stats' or 'balance') as arrays [L_moe, ...] by name."""
  entries = _moe_layer_entries(collection)
  if not entries:
    raise ValueError("No MoE layers found in the collection (expected layers_<i>/moe or "
                     "moe_layers/moe).")
  if len(entries) == 1 and "moe_layers" in collection:
    return dict(entries[0])
  return {name: jnp.stack([entry[name] for entry in entries]) for name in entries[0]}


def unstack_moe_layers(collection: dict, stacked: dict[str, jax.Array]) -> dict:
  """Inverse of `stack_moe_layers`: writes [L_moe, ...] arrays back into the tree."""
  if "moe_layers" in collection:
    return {**collection, "moe_layers": {"moe": dict(stacked)}}
  out = dict(collection)
  moe_names = [name for name in collection
               if _LAYER_NAME.match(name) and "moe" in collection[name]]
  moe_names.sort(key=lambda name: int(_LAYER_NAME.match(name).group(1)))
  for row, name in enumerate(moe_names):
    out[name] = {**collection[name],
                 "moe": {key: value[row] for key, value in stacked.items()}}
  return out
