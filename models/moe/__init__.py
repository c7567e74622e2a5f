"""The Mixture-of-Experts family ('moe'): the Llama decoder with routed SwiGLU experts.

  config.py  MoeConfig (the dense decoder's fields + the `moe` section), FLOPs
  model.py   the Flax modules (Moe, MoeBlock), the KV cache, per-layer stat helpers
  hf.py      transformers Mixtral and Qwen2-MoE checkpoints, both ways
"""

from models.family import ModelFamily
from models.moe import hf
from models.moe.config import MoeConfig, MoeLayerConfig
from models.moe.model import Moe, MoeBlock, init_cache, stack_moe_layers, unstack_moe_layers

FAMILY = ModelFamily(config_class=MoeConfig, model_class=Moe, init_cache=init_cache,
                     converters={"mixtral": hf.MIXTRAL, "qwen2_moe": hf.QWEN2_MOE})
