"""The RWKV-7 "Goose" family ('rwkv'): attention-free blocks of time mix + channel mix.

  config.py  RwkvConfig (the `config.model` fields), FLOPs, published low-rank widths
  model.py   the Flax modules (Rwkv, Block) and the recurrent decode cache
  pth.py     BlinkDL's .pth checkpoints (the `rwkv` package's layout), both ways, without torch
"""

from models.family import ModelFamily
from models.rwkv import pth
from models.rwkv.config import RwkvConfig, low_rank_sizes
from models.rwkv.model import Block, Rwkv, init_cache

FAMILY = ModelFamily(config_class=RwkvConfig, model_class=Rwkv, init_cache=init_cache,
                     converters={"rwkv7": pth.RWKV7_PTH})
