"""What the trainer needs to know of a model family, and its foreign checkpoint formats.

Each family package (models/<family>/) exposes one `ModelFamily` as `FAMILY`;
train/families.py pairs it with the task that trains it.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from models.config_schema import ModelConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Converter:
  """One foreign checkpoint format of a family, both ways (numpy in, numpy out).

  Attributes:
    description: what SRC / DST is, e.g. "transformers LlamaForCausalLM
      save_pretrained directory".
    read: SRC path -> (model config, plain params in the config's param_dtype).
    write: (DST path, model config, variables {'params': ..., **model_state})
      -> the files written. Raises ValueError naming what the format cannot hold.
    read_run_settings: SRC path -> {'section.field': value} of run settings the
      format carries besides the model (a diffusers scheduler's noise schedule),
      or None when it carries none.
    write_run_settings: (DST path, run config) -> the files written for those
      settings, or None.
  """
  description: str
  read: Callable[[str], tuple[ModelConfig, Params]]
  write: Callable[[str, ModelConfig, dict], list[str]]
  read_run_settings: Callable[[str], dict[str, Any]] | None = None
  write_run_settings: Callable[[str, Any], list[str]] | None = None


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  """A model family's model side.

  Attributes:
    config_class: its `config.model` dataclass (models.config_schema.ModelConfig).
    model_class: the Flax module, built as `model_class(config)`.
    init_cache: (config, batch, max_length) -> empty decode cache, for
      families that sample token by token; None otherwise.
    converters: foreign format name (as `train.convert --model=NAME`) -> Converter.
  """
  config_class: type[ModelConfig]
  model_class: type[nn.Module]
  init_cache: Callable[[Any, int, int], Any] | None = None
  converters: Mapping[str, Converter] = dataclasses.field(default_factory=dict)

  @property
  def name(self) -> str:
    return self.config_class.family
