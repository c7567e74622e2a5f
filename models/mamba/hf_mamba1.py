"""Conversion between Hugging Face `MambaForCausalLM` (Mamba-1) checkpoints and Treadle Mamba
params (`model.version=1`).

Pure numpy. HF fuses the mixer's input projection ([x | z] rows of
`in_proj.weight` [2·i, e]) and its selective projection ([dt | B | C] rows of
`x_proj.weight` [R + 2·N, i]); Treadle keeps each part as its own parameter
(in_x, in_z; x_dt, x_b, x_c), so the converter splits and re-joins them. Linear
weights are [out, in] in HF and [in, out] in Treadle; the depthwise
`conv1d.weight` is [i, 1, w] in HF and [w, i] in Treadle.

Shapes (layers/__init__.py): e embed, v vocab, i inner width, N state size,
R dt rank, w conv width, L layers.
"""

import numpy as np

from models.llama.hf import TensorReader
from models.mamba import hf_backbone
from models.mamba.config import MambaConfig


def model_config_from_hf(hf_config: dict) -> dict:
  """`config.model` field values read from an HF Mamba-1 config.json dict.

  Raises:
    ValueError: for a model_type other than 'mamba', a non-SiLU activation, or
      an intermediate_size that is not expand·hidden_size.
  """
  model_type = hf_config.get("model_type", "mamba")
  if model_type != "mamba":
    hint = " (use --model=mamba2)" if model_type == "mamba2" else ""
    raise ValueError(f"HF model_type={model_type!r}; this converter handles 'mamba'{hint}.")
  if hf_config.get("hidden_act", "silu") != "silu":
    raise ValueError(f"HF hidden_act={hf_config['hidden_act']!r}; only 'silu' is supported.")
  embed, expand = int(hf_config["hidden_size"]), hf_config.get("expand", 2)
  if float(expand) != int(expand):
    raise ValueError(f"HF expand={expand}; Treadle's model.expand is a whole number.")
  inner = int(hf_config.get("intermediate_size", int(expand) * embed))
  if inner != int(expand) * embed:
    raise ValueError(f"HF intermediate_size={inner} differs from expand·hidden_size="
                     f"{int(expand) * embed}.")
  rank = hf_config.get("time_step_rank", "auto")
  return dict(
      version=1, vocab_size=int(hf_config["vocab_size"]), embed_dim=embed,
      num_layers=int(hf_config["num_hidden_layers"]), state_size=int(hf_config["state_size"]),
      expand=int(expand), time_step_rank=rank if rank == "auto" else int(rank),
      conv_kernel=int(hf_config.get("conv_kernel", 4)),
      use_bias=bool(hf_config.get("use_bias", False)),
      use_conv_bias=bool(hf_config.get("use_conv_bias", True)), max_seq_len=2048,
      norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)),
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", True)))


def hf_config_from_model(cfg: MambaConfig) -> dict:
  """A config.json dict that transformers' `MambaForCausalLM` loads (float32 weights).

  Raises:
    ValueError: if the model is not Mamba-1 (model.version=2 exports with --model=mamba2)
      or is a hybrid (MambaForCausalLM has no attention blocks).
  """
  if cfg.version != 1:
    raise ValueError(f"model.version={cfg.version}: MambaForCausalLM holds Mamba-1 models "
                     "(version 1); export Mamba-2 with --model=mamba2.")
  if cfg.attention_layers:
    raise ValueError(f"model.attention_layers={cfg.attention_layers}: transformers' "
                     "MambaForCausalLM has no attention blocks, so a hybrid cannot be "
                     "written in its format.")
  return {
      "architectures": ["MambaForCausalLM"], "model_type": "mamba",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
      "num_hidden_layers": cfg.num_layers, "state_size": cfg.state_size,
      "expand": cfg.expand, "intermediate_size": cfg.inner_dim,
      "time_step_rank": cfg.dt_rank, "conv_kernel": cfg.conv_kernel,
      "use_bias": cfg.use_bias, "use_conv_bias": cfg.use_conv_bias,
      "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
      "hidden_act": "silu", "residual_in_fp32": True, "use_cache": True,
      "torch_dtype": "float32", "dtype": "float32",
  }


def _block_from_hf(reader: TensorReader, prefix: str, cfg: MambaConfig) -> dict:
  e, i, n, r, w = cfg.embed_dim, cfg.inner_dim, cfg.state_size, cfg.dt_rank, cfg.conv_kernel
  p = prefix + "mixer."
  in_x, in_z = np.split(reader.take(p + "in_proj.weight", (2 * i, e)), 2, axis=0)
  x_dt, x_b, x_c = np.split(reader.take(p + "x_proj.weight", (r + 2 * n, i)), [r, r + n], axis=0)
  mixer = {
      "in_x": {"kernel": in_x.T}, "in_z": {"kernel": in_z.T},
      "conv": {"kernel": reader.take(p + "conv1d.weight", (i, 1, w))[:, 0].T},
      "x_dt": {"kernel": x_dt.T}, "x_b": {"kernel": x_b.T}, "x_c": {"kernel": x_c.T},
      "dt_proj": {"kernel": reader.take(p + "dt_proj.weight", (i, r)).T,
                  "bias": reader.take(p + "dt_proj.bias", (i,))},
      "A_log": reader.take(p + "A_log", (i, n)), "D": reader.take(p + "D", (i,)),
      "out": {"kernel": reader.take(p + "out_proj.weight", (e, i)).T},
  }
  if cfg.use_conv_bias:
    mixer["conv"]["bias"] = reader.take(p + "conv1d.bias", (i,))
  if cfg.use_bias:
    in_bx, in_bz = np.split(reader.take(p + "in_proj.bias", (2 * i,)), 2)
    mixer["in_x"]["bias"], mixer["in_z"]["bias"] = in_bx, in_bz
    mixer["out"]["bias"] = reader.take(p + "out_proj.bias", (e,))
  return {"norm": {"scale": reader.take(prefix + "norm.weight", (e,))}, "mixer": mixer}


def _block_to_hf(block: dict, prefix: str, cfg: MambaConfig) -> dict[str, np.ndarray]:
  m, p = block["mixer"], prefix + "mixer."
  out = {
      prefix + "norm.weight": block["norm"]["scale"],
      p + "in_proj.weight": np.concatenate([m["in_x"]["kernel"].T, m["in_z"]["kernel"].T]),
      p + "conv1d.weight": m["conv"]["kernel"].T[:, None, :],
      p + "x_proj.weight": np.concatenate([m[name]["kernel"].T
                                           for name in ("x_dt", "x_b", "x_c")]),
      p + "dt_proj.weight": m["dt_proj"]["kernel"].T, p + "dt_proj.bias": m["dt_proj"]["bias"],
      p + "A_log": m["A_log"], p + "D": m["D"],
      p + "out_proj.weight": m["out"]["kernel"].T,
  }
  if cfg.use_conv_bias:
    out[p + "conv1d.bias"] = m["conv"]["bias"]
  if cfg.use_bias:
    out[p + "in_proj.bias"] = np.concatenate([m["in_x"]["bias"], m["in_z"]["bias"]])
    out[p + "out_proj.bias"] = m["out"]["bias"]
  return out


def params_from_hf(tensors: dict[str, np.ndarray], cfg: MambaConfig) -> dict:
  """HF state dict -> plain Treadle params (see hf_backbone.params_from_hf)."""
  return hf_backbone.params_from_hf(tensors, cfg, _block_from_hf)


def hf_from_params(params, cfg: MambaConfig) -> dict[str, np.ndarray]:
  """Treadle params -> HF state dict of float32 arrays (see hf_backbone.hf_from_params)."""
  return hf_backbone.hf_from_params(params, cfg, _block_to_hf)


MAMBA = hf_backbone.converter("a transformers MambaForCausalLM (Mamba-1) save_pretrained directory",
                              model_config_from_hf, hf_config_from_model, _block_from_hf,
                              _block_to_hf)
