"""The registry of model families: each family's model package and the task that trains it.

A family is imported only when a config names it. Adding one is one line in
`REGISTRY` (see the README's "Adding a model family").
"""

import dataclasses
import functools
import importlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from models.config_schema import ModelConfig
from models.family import ModelFamily
from pallas_kernels.common.config import chip_of_device
from train.tasks.base import Task

# family name -> (model package exposing FAMILY, "module:TaskClass" that trains it).
REGISTRY: dict[str, tuple[str, str]] = {
    "llama": ("models.llama", "train.tasks.language_model:LanguageModelTask"),
    "moe": ("models.moe", "train.tasks.moe_language_model:MoeLanguageModelTask"),
    "mamba": ("models.mamba", "train.tasks.language_model:LanguageModelTask"),
    "rwkv": ("models.rwkv", "train.tasks.language_model:LanguageModelTask"),
    "unet": ("models.unet", "train.tasks.diffusion:DiffusionTask"),
}


@dataclasses.dataclass(frozen=True)
class Family:
  """A registered family: its model side and its task."""
  model: ModelFamily
  task: Task

  @property
  def name(self) -> str:
    return self.model.name


def _check_name(name: str) -> None:
  if name not in REGISTRY:
    raise ValueError(f"config.model.family={name!r} is not one of {sorted(REGISTRY)}.")


@functools.cache
def get_family(name: str) -> Family:
  """The family `name` (imported on first use), or an error listing the known ones."""
  _check_name(name)
  package, task_path = REGISTRY[name]
  model_family = importlib.import_module(package).FAMILY
  module, task_class = task_path.split(":")
  task = getattr(importlib.import_module(module), task_class)(model_family)
  return Family(model=model_family, task=task)


def model_config(model_section: Mapping[str, Any]) -> ModelConfig:
  """`config.model` (a ConfigDict or the dict saved with a checkpoint) as its family's
  config dataclass; ValueError naming a missing family, an unknown key or a wrong type."""
  if "family" not in model_section:
    raise ValueError("config.model has no 'family' field: configs written before Treadle's "
                     "per-family config sections are not readable; retrain or re-import.")
  family = get_family(model_section["family"])
  try:
    return family.model.config_class.from_dict(model_section)
  except ValueError as e:
    old = {"nsa_window", "num_experts", "moe_impl"} & set(model_section)
    if old:
      raise ValueError(
          f"This config predates Treadle's per-family config sections (it has flat "
          f"model.{sorted(old)[0]}; fields now nest as model.nsa.* and model.moe.*): {e} "
          "Retrain, or re-import with `python -m train.convert import`.") from e
    raise


def build_model(model_section: Mapping[str, Any]) -> nn.Module:
  """The family's module for `config.model`.

  The kernel target (`model.attention_chip` '' = this machine's) is resolved
  here, when the model is built, so nothing queries the device while tracing;
  it stays '' where no kernel targets the device (CPU: interpret mode).
  """
  config = model_config(model_section).on_chip(chip_of_device(jax.devices()[0]) or "")
  return get_family(model_section["family"]).model.model_class(config)
