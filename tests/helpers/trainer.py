"""Small configs and readers shared by the end-to-end tests."""

import json
import os

from configs import llama_tiny
from configs import mamba_tiny
from configs import moe_tiny
from configs import rwkv_tiny
from configs import unet_tiny

_TINY = {"llama": llama_tiny.get_config, "moe": moe_tiny.get_config,
         "mamba": mamba_tiny.get_config, "rwkv": rwkv_tiny.get_config,
         "unet": unet_tiny.get_config}
# The model fields tiny_config shrinks, per family (the decoders share theirs).
_DECODER = {"model.embed_dim": 32, "model.num_layers": 2, "model.mlp_dim": 64,
            "model.head_dim": 8, "model.max_seq_len": 64, "model.dtype": "float32"}
_TINY_MODEL = {"llama": _DECODER, "moe": _DECODER,
               "mamba": {"model.embed_dim": 32, "model.num_layers": 2, "model.num_heads": 4,
                         "model.head_dim": 16, "model.state_size": 8, "model.chunk_size": 16,
                         "model.max_seq_len": 64, "model.dtype": "float32"},
               "rwkv": {"model.embed_dim": 32, "model.num_layers": 2, "model.head_size": 8,
                        "model.hidden_dim": 128, "model.decay_rank": 8, "model.iclr_rank": 8,
                        "model.value_rank": 8, "model.gate_rank": 16, "model.max_seq_len": 64,
                        "model.dtype": "float32"},
               # One level (no resampling): the trainer path at the least compile time.
               "unet": {"model.block_out_channels": (16,),
                        "model.down_block_types": ("AttnDownBlock2D",),
                        "model.up_block_types": ("AttnUpBlock2D",)}}
# Run settings of the tiny configs, per modality.
_TINY_RUN = {"text": {"data.seq_len": 32, "sample.num_scored": 0, "sample.max_new_tokens": 4},
             "images": {"data.name": "treadle_shapes/tiny", "sample.num_scored": 0,
                        "sample.num_steps": 2, "sample.num_per_class": 1,
                        "opt.ema_decay": 0.9}}


def tiny_config(data_dir: str, family: str = "llama", **overrides):
  """A seconds-fast llama_tiny (or moe_tiny, mamba_tiny, rwkv_tiny: 32-token rows, float32
  compute; unet_tiny: one level of 16 channels with attention, on the tiny shapes), 8 rows
  per batch.

  `overrides` are dotted keys, e.g. `{'train.num_steps': 4}` or
  `{'model.nsa.window': 16}`, passed as tiny_config(d, **{'train.num_steps': 4}).
  """
  config = _TINY[family]()
  modality = "images" if "diffusion" in config else "text"
  values = {
      "data.data_dir": data_dir, "data.global_batch_size": 8,
      **_TINY_MODEL[family], **_TINY_RUN[modality], "train.num_steps": 6,
      "train.log_every_steps": 1, "evals.every_steps": 0,
      "checkpoint.every_steps": 3, "checkpoint.async_save": False, "opt.warmup_steps": 2,
  }
  values.update(overrides)
  set_fields(config, values)
  return config


def set_fields(config, values: dict) -> None:
  """config[a][b][c] = value for each dotted key 'a.b.c'."""
  for key, value in values.items():
    *sections, field = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[field] = value


def read_metrics(workdir: str, split: str = "train") -> dict[int, dict]:
  """metrics.jsonl entries of one split, by step."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r for r in records if r["split"] == split}


def to_flags(overrides: dict) -> list[str]:
  return [f"--config.{key}={value}" for key, value in overrides.items()]
