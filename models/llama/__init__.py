"""The dense decoder family ('llama'): Llama-style, with dense or Native Sparse Attention.

  config.py  LlamaConfig (the `config.model` fields), NsaConfig, FLOPs
  model.py   the Flax modules (Llama, Block) and the KV cache
  hf.py      transformers LlamaForCausalLM checkpoints, both ways, and the shared tables
  hf_zoo.py  Qwen2/2.5, Qwen3, Mistral and Gemma 3 (text) checkpoints, both ways
"""

from models.family import ModelFamily
from models.llama import hf, hf_zoo
from models.llama.config import LlamaConfig, NsaConfig, RopeScalingConfig
from models.llama.model import Block, Llama, init_cache, stack_blocks

FAMILY = ModelFamily(config_class=LlamaConfig, model_class=Llama, init_cache=init_cache,
                     converters={"llama": hf.LLAMA, **hf_zoo.CONVERTERS})
