"""Model families: the module each builds and the task that trains it."""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax

from models import llama
from models import moe
from pallas_kernels.common import config as kernel_config
from train import flops
from train import lm_task
from train import moe_task
from train.task import Task


@dataclasses.dataclass(frozen=True)
class Family:
  """How to build one model family and train it."""
  make_model: Callable[[object], nn.Module]  # config.model -> module
  task: Task
  train_flops_per_token: Callable[[object, int], float]  # (config.model, seq_len) -> FLOPs


def kernel_chip(model_config) -> str:
  """`model.attention_chip`, or this machine's kernel target when it is ''.

  Resolved here, when the model is built, so nothing queries the device while
  tracing. '' stays '' where no kernel targets the device (CPU: interpret mode).
  """
  if model_config.attention_chip:
    return model_config.attention_chip
  return kernel_config.chip_of_device(jax.devices()[0]) or ""


def _make_llama(model_config) -> nn.Module:
  config = llama.LlamaConfig.from_config_dict(model_config)
  return llama.Llama(dataclasses.replace(config, attention_chip=kernel_chip(model_config)))


def _make_moe(model_config) -> nn.Module:
  config = moe.MoeConfig.from_config_dict(model_config)
  return moe.Moe(dataclasses.replace(config, attention_chip=kernel_chip(model_config)))


FAMILIES: dict[str, Family] = {
    "llama": Family(make_model=_make_llama,
                    task=lm_task.LanguageModelTask(init_cache=llama.init_cache),
                    train_flops_per_token=flops.llama_train_flops_per_token),
    "moe": Family(make_model=_make_moe,
                  task=moe_task.MoeLanguageModelTask(init_cache=moe.init_cache),
                  train_flops_per_token=flops.moe_train_flops_per_token),
}


def get_family(model_config) -> Family:
  """The family named by `config.model.family`, or an error listing the known ones."""
  family = FAMILIES.get(model_config.family)
  if family is None:
    raise ValueError(f"config.model.family={model_config.family!r} is not one of "
                     f"{sorted(FAMILIES)}.")
  return family


def build_model(model_config) -> nn.Module:
  return get_family(model_config).make_model(model_config)
