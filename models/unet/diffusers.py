"""Conversion between diffusers `UNet2DModel` directories and Treadle UNet params.

Pure numpy, safetensors and json (no torch, no diffusers import). A directory is
what `UNet2DModel.save_pretrained` writes: config.json and
diffusion_pytorch_model.safetensors; `read` also takes a pipeline directory
holding it as unet/. Treadle names its modules after diffusers' ('down_blocks_0'
for 'down_blocks.0'), so the parameter names map one to one:

  Treadle leaf                       diffusers tensor
  .../<conv>/kernel [kh, kw, i, o]   .../<conv>.weight [o, i, kh, kw] (OIHW)
  .../<linear>/kernel [i, o]         .../<linear>.weight [o, i]
  .../<group norm>/scale             .../<group norm>.weight
  .../bias                           .../bias
  class_embedding [n, 4·c0]          class_embedding.weight

The scheduler config beside the model becomes run settings through
models/unet/diffusers_scheduler.py (registered on the same converter). Shapes:
see layers/__init__.py.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_np

from models import hf_io
from models.family import Converter
from models.llama.hf import TensorReader, as_numpy
from models.unet import diffusers_scheduler
from models.unet.config import UNetConfig
from models.unet.model import UNet

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_DIFFUSERS_VERSION = "0.42.1"  # Written into config.json; diffusers only logs a mismatch.
# Module lists whose items diffusers names '<list>.<i>' where Linen names '<list>_<i>'.
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
          "to_out")
_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                               "proj_attn": "to_out.0"}
# diffusers config value -> the only value Treadle's UNet implements.
_FIXED = {
    "center_input_sample": False, "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv",
    "upsample_type": "conv", "act_fn": "silu", "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None,
}


def _diffusers_name(path: tuple[str, ...]) -> str:
  """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
  parts = []
  for part in path[:-1]:
    head, _, index = part.rpartition("_")
    parts.append(f"{head}.{index}" if head in _LISTS and index.isdigit() else part)
  leaf = path[-1]
  if path == ("class_embedding",):
    return "class_embedding.weight"
  parts.append("bias" if leaf == "bias" else "weight")
  return ".".join(parts)


def _to_diffusers(w: np.ndarray) -> np.ndarray:
  """A Treadle leaf in diffusers' layout: HWIO -> OIHW, [in, out] -> [out, in]."""
  if w.ndim == 4:
    return w.transpose(3, 2, 0, 1)
  return w.T if w.ndim == 2 else w


def _from_diffusers(w: np.ndarray, is_table: bool) -> np.ndarray:
  if w.ndim == 4:
    return w.transpose(2, 3, 1, 0)
  return w.T if w.ndim == 2 and not is_table else w


def _diffusers_shape(shape: tuple[int, ...], is_table: bool) -> tuple[int, ...]:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape)) if len(shape) == 2 and not is_table else tuple(shape)


def _param_shapes(cfg: UNetConfig) -> dict:
  """The plain param tree of `UNet(cfg)` as ShapeDtypeStructs (nothing computed)."""
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.in_channels))
  labels = jnp.zeros((1,), jnp.int32) if cfg.num_class_embeds else None
  init = lambda: UNet(cfg).init(jax.random.key(0), images, jnp.zeros((1,)), labels)  # noqa: E731
  return nn.unbox(jax.eval_shape(init)["params"])


def model_config_from_diffusers(unet_config: dict) -> dict:
  """`config.model` field values read from a UNet2DModel config.json dict.

  Raises:
    ValueError: naming each config.json field whose value Treadle's UNet does not
      implement (the class name, other block types, time-embedding or class-
      embedding variants, 'scale_shift' resnets, a separate attention norm, ...).
  """
  class_name = unet_config.get("_class_name", "UNet2DModel")
  if class_name != "UNet2DModel":
    raise ValueError(f"config.json _class_name={class_name!r}; this converter reads "
                     "'UNet2DModel' directories.")
  unsupported = [f"{key}={unet_config[key]!r} (supported: {value!r})"
                 for key, value in _FIXED.items()
                 if key in unet_config and unet_config[key] != value]
  channels = tuple(int(c) for c in unet_config.get("block_out_channels", (224, 448, 672, 896)))
  embed_dim = unet_config.get("time_embedding_dim")
  if embed_dim is not None and embed_dim != 4 * channels[0]:
    unsupported.append(f"time_embedding_dim={embed_dim} (supported: None or "
                       f"4·block_out_channels[0]={4 * channels[0]})")
  groups = unet_config.get("norm_num_groups", 32)
  attn_groups = unet_config.get("attn_norm_num_groups")
  if attn_groups is not None and attn_groups != groups:
    unsupported.append(f"attn_norm_num_groups={attn_groups} (supported: None or "
                       f"norm_num_groups={groups})")
  if groups is None:
    unsupported.append("norm_num_groups=None (supported: an int)")
  if unsupported:
    raise ValueError("diffusers UNet2DModel config.json fields Treadle's UNet does not "
                     "implement: " + "; ".join(unsupported) + ".")
  size = unet_config.get("sample_size")
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      raise ValueError(f"config.json sample_size={size}: Treadle's UNet takes square images.")
    size = size[0]
  fields = dict(
      in_channels=int(unet_config.get("in_channels", 3)),
      out_channels=int(unet_config.get("out_channels", 3)),
      block_out_channels=channels,
      down_block_types=tuple(unet_config.get(
          "down_block_types", ("DownBlock2D",) + ("AttnDownBlock2D",) * 3)),
      up_block_types=tuple(unet_config.get(
          "up_block_types", ("AttnUpBlock2D",) * 3 + ("UpBlock2D",))),
      layers_per_block=int(unet_config.get("layers_per_block", 2)),
      attention_head_dim=int(unet_config.get("attention_head_dim", 8) or 0),
      norm_num_groups=int(groups), norm_eps=float(unet_config.get("norm_eps", 1e-5)),
      flip_sin_to_cos=bool(unet_config.get("flip_sin_to_cos", True)),
      freq_shift=int(unet_config.get("freq_shift", 0)),
      downsample_padding=int(unet_config.get("downsample_padding", 1)),
      num_class_embeds=int(unet_config.get("num_class_embeds") or 0),
      dropout=float(unet_config.get("dropout", 0.0)))
  if size is not None:
    fields["image_size"] = int(size)
  return fields


def diffusers_config_from_model(cfg: UNetConfig) -> dict:
  """A config.json dict that `diffusers.UNet2DModel.from_pretrained` loads."""
  return {
      "_class_name": "UNet2DModel", "_diffusers_version": _DIFFUSERS_VERSION,
      "sample_size": cfg.image_size, "in_channels": cfg.in_channels,
      "out_channels": cfg.out_channels, "center_input_sample": False,
      "time_embedding_type": "positional", "time_embedding_dim": None,
      "freq_shift": cfg.freq_shift, "flip_sin_to_cos": cfg.flip_sin_to_cos,
      "down_block_types": list(cfg.down_block_types), "mid_block_type": "UNetMidBlock2D",
      "up_block_types": list(cfg.up_block_types),
      "block_out_channels": list(cfg.block_out_channels),
      "layers_per_block": cfg.layers_per_block, "mid_block_scale_factor": 1,
      "downsample_padding": cfg.downsample_padding, "downsample_type": "conv",
      "upsample_type": "conv", "dropout": cfg.dropout, "act_fn": "silu",
      # diffusers' None (one head of all channels) is 0 here.
      "attention_head_dim": cfg.attention_head_dim or None,
      "norm_num_groups": cfg.norm_num_groups, "attn_norm_num_groups": None,
      "norm_eps": cfg.norm_eps, "resnet_time_scale_shift": "default", "add_attention": True,
      "class_embed_type": None, "num_class_embeds": cfg.num_class_embeds or None,
      "num_train_timesteps": None,
  }


def _renamed_deprecated_attention(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Early diffusers checkpoints (google/ddpm-*) name attention projections query, key,
  value and proj_attn; diffusers renames them on load to to_q, to_k, to_v and to_out.0."""
  out = {}
  for name, w in tensors.items():
    prefix, _, leaf = name.rpartition(".")
    head, _, proj = prefix.rpartition(".")
    if ".attentions." in name and proj in _DEPRECATED_ATTENTION_NAMES:
      name = f"{head}.{_DEPRECATED_ATTENTION_NAMES[proj]}.{leaf}"
    out[name] = w
  return out


def params_from_diffusers(tensors: dict[str, np.ndarray], cfg: UNetConfig) -> dict:
  """diffusers state dict (name -> array) -> plain Treadle params in `param_dtype`.

  Early checkpoints' attention names (query, key, value, proj_attn) are read too.

  Raises:
    ValueError: naming a tensor that is missing, has the wrong shape, or is unused.
  """
  reader = TensorReader(_renamed_deprecated_attention(tensors))

  def take(path, shape_struct):
    names = tuple(k.key for k in path)
    is_table = names == ("class_embedding",)
    w = reader.take(_diffusers_name(names), _diffusers_shape(shape_struct.shape, is_table))
    return _from_diffusers(w, is_table)

  params = jax.tree_util.tree_map_with_path(take, _param_shapes(cfg))
  reader.check_all_used("UNet")
  return as_numpy(params, np.dtype(jnp.dtype(cfg.param_dtype)))


def diffusers_from_params(params) -> dict[str, np.ndarray]:
  """Treadle params (boxed or plain, any device) -> diffusers state dict of float32 arrays."""
  flat = jax.tree_util.tree_flatten_with_path(as_numpy(params, np.float32))[0]
  out = {}
  for path, w in flat:
    names = tuple(k.key for k in path)
    out[_diffusers_name(names)] = w if names == ("class_embedding",) else _to_diffusers(w)
  return {name: np.ascontiguousarray(w) for name, w in out.items()}


def read_checkpoint(path: str) -> tuple[UNetConfig, dict]:
  """A `UNet2DModel.save_pretrained` directory (or a pipeline directory with unet/)
  -> (model config, plain params)."""
  if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(
      os.path.join(path, "unet")):
    path = os.path.join(path, "unet")
  unet_config, tensors = hf_io.read_hf_dir(path)
  cfg = UNetConfig.from_dict(model_config_from_diffusers(unet_config))
  return cfg, params_from_diffusers(tensors, cfg)


def write_checkpoint(dst: str, cfg: UNetConfig, variables: dict) -> list[str]:
  """Writes config.json and float32 diffusion_pytorch_model.safetensors that
  `UNet2DModel.from_pretrained(dst)` loads."""
  os.makedirs(dst, exist_ok=True)
  paths = [os.path.join(dst, "config.json"), os.path.join(dst, WEIGHTS_NAME)]
  with open(paths[0], "w") as f:
    json.dump(diffusers_config_from_model(cfg), f, indent=2)
  safetensors_np.save_file(diffusers_from_params(variables["params"]), paths[1],
                           metadata={"format": "pt"})
  return paths


UNET2D = Converter("a diffusers UNet2DModel save_pretrained directory (config.json + "
                   "diffusion_pytorch_model.safetensors [+ scheduler_config.json])",
                   read_checkpoint, write_checkpoint,
                   read_run_settings=diffusers_scheduler.read_run_settings,
                   write_run_settings=diffusers_scheduler.write_run_settings)
