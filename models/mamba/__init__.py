"""The Mamba family ('mamba'): a stack of Mamba-1 (selective scan) or Mamba-2 (SSD) mixers
(`model.version`); `model.attention_layers` puts Llama attention blocks among them (a
Jamba-style hybrid).

  config.py  MambaConfig (the `config.model` fields), FLOPs
  model.py   the Flax modules (Mamba, Block) and the recurrent decode cache
  hybrid.py  Jamba-style stacks: Llama decoder blocks at model.attention_layers
  hf.py      transformers Mamba2ForCausalLM checkpoints, both ways
  hf_mamba1.py  transformers MambaForCausalLM (Mamba-1) checkpoints, both ways
  hf_backbone.py  what both converters share: embeddings, norms, head, the block loop
"""

from models.family import ModelFamily
from models.mamba import hf
from models.mamba import hf_mamba1
from models.mamba.config import HybridAttentionConfig, MambaConfig
from models.mamba.model import Block, Mamba, init_cache

FAMILY = ModelFamily(config_class=MambaConfig, model_class=Mamba, init_cache=init_cache,
                     converters={"mamba": hf_mamba1.MAMBA, "mamba2": hf.MAMBA2})
