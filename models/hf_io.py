"""Reading and writing Hugging Face checkpoint directories: config.json and safetensors.

Pure numpy (safetensors' numpy API plus a reader that also takes bfloat16 and
float8 tensors, memory-mapped); the family converters (models/<family>/hf.py)
build on it.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import numpy as safetensors_np

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
