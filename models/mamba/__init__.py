"""The Mamba family ('mamba'): a stack of Mamba-2 (SSD) mixers, no attention.

  config.py  MambaConfig (the `config.model` fields), FLOPs
  model.py   the Flax modules (Mamba, Block) and the recurrent decode cache
  hf.py      transformers Mamba2ForCausalLM checkpoints, both ways
"""

from models.family import ModelFamily
from models.mamba import hf
from models.mamba.config import MambaConfig
from models.mamba.model import Block, Mamba, init_cache

FAMILY = ModelFamily(config_class=MambaConfig, model_class=Mamba, init_cache=init_cache,
                     converters={"mamba2": hf.MAMBA2})
