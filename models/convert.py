"""Checkpoint conversion between Hugging Face directories and Treadle workdirs.

python -m models.convert import-hf --model=llama HF_DIR WORKDIR
python -m models.convert export-hf --model=llama WORKDIR HF_DIR

--model names the HF architecture: llama (LlamaForCausalLM), mixtral
(MixtralForCausalLM) or qwen2_moe (Qwen2MoeForCausalLM); the last two import
into and export from Treadle's 'moe' family.

import-hf writes a params-only Treadle checkpoint whose config is the family's
`configs/<family>.py:size=tiny` with the model fields taken from the HF
config.json; `python -m train.main --config=configs/finetune.py:workdir=WORKDIR
--workdir=WORKDIR` then fine-tunes it.
export-hf writes config.json and float32 safetensors that
`transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` loads.
"""

import dataclasses
import importlib
import json
import os
import struct
from collections.abc import Callable

import jax
import ml_collections
import ml_dtypes
import numpy as np
from absl import app
from absl import flags
from safetensors import numpy as safetensors_np

from models import llama
from models import llama_hf
from models import moe
from models import moe_hf


@dataclasses.dataclass(frozen=True)
class Converter:
  """How one HF architecture maps to and from a Treadle model family."""
  family: str  # The Treadle `config.model.family` it imports into and exports from.
  config_module: str  # configs.<name>, whose get_config('size=tiny') seeds imports.
  config_cls: type  # Frozen model config with from_config_dict.
  model_config_from_hf: Callable[[dict], dict]
  hf_config_from_model: Callable[[object], dict]
  params_from_hf: Callable[[dict, object], dict]
  hf_from_params: Callable[[object, object], dict]


CONVERTERS: dict[str, Converter] = {
    "llama": Converter("llama", "configs.llama", llama.LlamaConfig,
                       llama_hf.model_config_from_hf, llama_hf.hf_config_from_model,
                       llama_hf.params_from_hf, llama_hf.hf_from_params),
    "mixtral": Converter("moe", "configs.moe", moe.MoeConfig, moe_hf.mixtral_config_from_hf,
                         moe_hf.hf_mixtral_config, moe_hf.mixtral_params_from_hf,
                         moe_hf.hf_mixtral_from_params),
    "qwen2_moe": Converter("moe", "configs.moe", moe.MoeConfig, moe_hf.qwen2_moe_config_from_hf,
                           moe_hf.hf_qwen2_moe_config, moe_hf.qwen2_moe_params_from_hf,
                           moe_hf.hf_qwen2_moe_from_params),
}

_MODEL = flags.DEFINE_enum("model", "llama", sorted(CONVERTERS),
                            "HF architecture to convert (see CONVERTERS).")

MAX_SHARD_BYTES = 5 * 2**30
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors in one .safetensors file, bfloat16 included (memory-mapped)."""
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
    start, end = info["data_offsets"]
    raw = data[start:end].view(_SAFETENSORS_DTYPES[info["dtype"]])
    tensors[name] = raw.reshape(info["shape"])
  return tensors


def read_hf_dir(hf_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, all tensors) of an HF model directory."""
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf_config = json.load(f)
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"No .safetensors files in {hf_dir} (.bin checkpoints are not read; "
                            "re-save them with save_pretrained(safe_serialization=True)).")
  tensors = {}
  for name in files:
    tensors.update(read_safetensors(os.path.join(hf_dir, name)))
  return hf_config, tensors


def write_hf_dir(hf_dir: str, hf_config: dict, tensors: dict[str, np.ndarray],
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes config.json and safetensors (sharded above `max_shard_bytes`); returns paths."""
  os.makedirs(hf_dir, exist_ok=True)
  paths = [os.path.join(hf_dir, "config.json")]
  with open(paths[0], "w") as f:
    json.dump(hf_config, f, indent=2)
  shards, size = [{}], 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  if len(shards) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {t: n for n, shard in zip(names, shards) for t in shard}
    total = sum(w.nbytes for w in tensors.values())
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    with open(index, "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    paths.append(index)
  for name, shard in zip(names, shards):
    paths.append(os.path.join(hf_dir, name))
    safetensors_np.save_file(shard, paths[-1], metadata={"format": "pt"})
  return paths


def imported_config(converter: Converter, hf_config: dict) -> ml_collections.ConfigDict:
  """The Treadle run config for an imported HF model (tiny run settings, HF model shape)."""
  base = importlib.import_module(converter.config_module).get_config("size=tiny")
  config = ml_collections.ConfigDict(base.to_dict())  # An unlocked copy.
  config.model.update(converter.model_config_from_hf(hf_config))
  converter.config_cls.from_config_dict(config.model)  # Validates.
  return config


def import_hf(model: str, hf_dir: str, workdir: str) -> list[str]:
  """Converts an HF directory into a params-only Treadle checkpoint in `workdir`."""
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  converter = CONVERTERS[model]
  hf_config, tensors = read_hf_dir(hf_dir)
  config = imported_config(converter, hf_config)
  params = converter.params_from_hf(tensors, converter.config_cls.from_config_dict(config.model))
  checkpoint.save_imported(workdir, params, config)
  return [str(checkpoint.checkpoint_dir(workdir))]


def export_hf(model: str, workdir: str, hf_dir: str) -> list[str]:
  """Writes the latest checkpoint in `workdir` as an HF directory; returns the paths."""
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  converter = CONVERTERS[model]
  config = checkpoint.load_config(workdir)
  if config.model.family != converter.family:
    raise ValueError(f"{workdir} holds a {config.model.family!r} model; --model={model} exports "
                     f"the {converter.family!r} family.")
  cfg = converter.config_cls.from_config_dict(config.model)
  _, variables = checkpoint.load_model(workdir)
  if any(np.any(np.asarray(b)) for b in jax.tree.leaves(variables.get("balance", {}))):
    raise ValueError(f"{workdir}: the MoE selection biases ('balance') are nonzero and HF "
                     f"{model} has no place for them.")
  return write_hf_dir(hf_dir, converter.hf_config_from_model(cfg),
                      converter.hf_from_params(variables["params"], cfg))


COMMANDS = {"import-hf": import_hf, "export-hf": export_hf}


def main(argv):
  if len(argv) != 4 or argv[1] not in COMMANDS:
    raise app.UsageError(
        f"usage: python -m models.convert import-hf --model={{{','.join(CONVERTERS)}}} "
        "HF_DIR WORKDIR\n"
        f"       python -m models.convert export-hf --model={{{','.join(CONVERTERS)}}} "
        "WORKDIR HF_DIR")
  for path in COMMANDS[argv[1]](_MODEL.value, argv[2], argv[3]):
    print(path)


if __name__ == "__main__":
  app.run(main)
