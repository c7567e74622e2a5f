"""Conversion between Hugging Face `Mamba2ForCausalLM` checkpoints and Treadle Mamba params.

Pure numpy. HF fuses the mixer's input projection ([z | x | B | C | dt] rows of
`in_proj.weight` [2·h·d + 2·ng·N + h, e]) and its convolution (`conv1d.weight`
[h·d + 2·ng·N, 1, w] over [x | B | C]); Treadle keeps each part as its own
parameter (in_z, in_x, in_b, in_c, in_dt; conv_x, conv_b, conv_c), so the
converter splits and re-joins them. Linear weights are [out, in] in HF and
[in, out] in Treadle.

Shapes (layers/__init__.py): e embed, v vocab, h heads, d head dim, N state
size, ng groups, w conv width, L layers.
"""

import numpy as np

from models.llama.hf import TensorReader
from models.mamba import hf_backbone
from models.mamba.config import MambaConfig


def _float(value) -> float:
  """A config.json number; transformers 5 writes non-finite ones as {"__float__": "Infinity"}."""
  return float(value["__float__"] if isinstance(value, dict) else value)


def model_config_from_hf(hf_config: dict) -> dict:
  """`config.model` field values read from an HF Mamba-2 config.json dict.

  Raises:
    ValueError: for what Treadle's Mamba does not implement (projection
      biases, a conv without bias, a non-SiLU activation) or inconsistent widths.
  """
  model_type = hf_config.get("model_type", "mamba2")
  if model_type != "mamba2":
    hint = " (use --model=mamba)" if model_type == "mamba" else ""
    raise ValueError(f"HF model_type={model_type!r}; this converter handles 'mamba2'{hint}.")
  if hf_config.get("use_bias", False):
    raise ValueError("HF use_bias=True; Treadle's Mamba projections have no biases.")
  if not hf_config.get("use_conv_bias", True):
    raise ValueError("HF use_conv_bias=False; Treadle's Mamba convolution has a bias.")
  if hf_config.get("hidden_act", "silu") != "silu":
    raise ValueError(f"HF hidden_act={hf_config['hidden_act']!r}; only 'silu' is supported.")
  embed, heads, head_dim = (int(hf_config["hidden_size"]), int(hf_config["num_heads"]),
                            int(hf_config["head_dim"]))
  inner = int(hf_config.get("expand", 2) * embed)
  if inner != heads * head_dim:
    raise ValueError(f"HF expand·hidden_size={inner} differs from num_heads·head_dim="
                     f"{heads * head_dim}.")
  low, high = hf_config.get("time_step_limit", (0.0, float("inf")))
  return dict(
      vocab_size=int(hf_config["vocab_size"]), embed_dim=embed,
      num_layers=int(hf_config["num_hidden_layers"]), num_heads=heads, head_dim=head_dim,
      state_size=int(hf_config["state_size"]), num_groups=int(hf_config.get("n_groups", 1)),
      conv_kernel=int(hf_config.get("conv_kernel", 4)),
      chunk_size=int(hf_config.get("chunk_size", 256)),
      time_step_limit=(_float(low), _float(high)), max_seq_len=2048,
      norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)),
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)))


def hf_config_from_model(cfg: MambaConfig) -> dict:
  """A config.json dict that transformers' `Mamba2ForCausalLM` loads (float32 weights).

  Raises:
    ValueError: if h·d is not expand·e for a whole or decimal `expand`, for a
      Mamba-1 model (model.version=1 exports with --model=mamba), or for a hybrid
      (Mamba2ForCausalLM has no attention blocks).
  """
  if cfg.version != 2:
    raise ValueError(f"model.version={cfg.version}: Mamba2ForCausalLM holds Mamba-2 models "
                     "(version 2); export Mamba-1 with --model=mamba.")
  if cfg.attention_layers:
    raise ValueError(f"model.attention_layers={cfg.attention_layers}: transformers' "
                     "Mamba2ForCausalLM has no attention blocks, so a hybrid cannot be "
                     "written in its format.")
  expand = cfg.inner_dim / cfg.embed_dim
  if int(expand * cfg.embed_dim) != cfg.inner_dim:
    raise ValueError(f"model.num_heads·model.head_dim={cfg.inner_dim} is not expand·"
                     f"model.embed_dim for any float expand HF can hold.")
  return {
      "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
      "num_hidden_layers": cfg.num_layers, "num_heads": cfg.num_heads,
      "head_dim": cfg.head_dim, "expand": int(expand) if expand.is_integer() else expand,
      "state_size": cfg.state_size, "n_groups": cfg.num_groups,
      "conv_kernel": cfg.conv_kernel, "chunk_size": cfg.chunk_size,
      "time_step_limit": list(cfg.time_step_limit), "layer_norm_epsilon": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "use_bias": False, "use_conv_bias": True,
      "hidden_act": "silu", "residual_in_fp32": True, "use_cache": True,
      "torch_dtype": "float32", "dtype": "float32",
  }


def _splits(cfg: MambaConfig) -> tuple[list[int], list[int]]:
  """Row sizes of in_proj ([z | x | B | C | dt]) and channel sizes of conv1d ([x | B | C])."""
  groups = cfg.num_groups * cfg.state_size
  return ([cfg.inner_dim, cfg.inner_dim, groups, groups, cfg.num_heads],
          [cfg.inner_dim, groups, groups])


def _block_from_hf(reader: TensorReader, prefix: str, cfg: MambaConfig) -> dict:
  e, h, d, ng, n, w = (cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.num_groups,
                       cfg.state_size, cfg.conv_kernel)
  proj_sizes, conv_sizes = _splits(cfg)
  heads, groups = (h, d), (ng, n)
  in_proj = reader.take(prefix + "mixer.in_proj.weight", (sum(proj_sizes), e))
  z, x, b, c, dt = np.split(in_proj, np.cumsum(proj_sizes)[:-1], axis=0)
  conv_w = reader.take(prefix + "mixer.conv1d.weight", (sum(conv_sizes), 1, w))[:, 0].T
  conv_b = reader.take(prefix + "mixer.conv1d.bias", (sum(conv_sizes),))
  cuts = np.cumsum(conv_sizes)[:-1]
  kx, kb, kc = np.split(conv_w, cuts, axis=1)
  bx, bb, bc = np.split(conv_b, cuts)
  mixer = {
      "in_z": {"kernel": z.T.reshape(e, *heads)}, "in_x": {"kernel": x.T.reshape(e, *heads)},
      "in_b": {"kernel": b.T.reshape(e, *groups)}, "in_c": {"kernel": c.T.reshape(e, *groups)},
      "in_dt": {"kernel": dt.T},
      "conv_x": {"kernel": kx.reshape(w, *heads), "bias": bx.reshape(heads)},
      "conv_b": {"kernel": kb.reshape(w, *groups), "bias": bb.reshape(groups)},
      "conv_c": {"kernel": kc.reshape(w, *groups), "bias": bc.reshape(groups)},
      "dt_bias": reader.take(prefix + "mixer.dt_bias", (h,)),
      "A_log": reader.take(prefix + "mixer.A_log", (h,)),
      "D": reader.take(prefix + "mixer.D", (h,)),
      "norm": {"scale": reader.take(prefix + "mixer.norm.weight", (h * d,)).reshape(heads)},
      "out": {"kernel": reader.take(prefix + "mixer.out_proj.weight",
                                    (e, h * d)).T.reshape(h, d, e)},
  }
  return {"norm": {"scale": reader.take(prefix + "norm.weight", (e,))}, "mixer": mixer}


def _block_to_hf(block: dict, prefix: str, cfg: MambaConfig) -> dict[str, np.ndarray]:
  m, e, w = block["mixer"], cfg.embed_dim, cfg.conv_kernel
  rows = lambda kernel: kernel.reshape(e, -1).T  # noqa: E731  [e, ...] -> [out, e]
  in_proj = np.concatenate([rows(m[name]["kernel"]) for name in
                            ("in_z", "in_x", "in_b", "in_c", "in_dt")], axis=0)
  parts = ("conv_x", "conv_b", "conv_c")
  conv_w = np.concatenate([m[p]["kernel"].reshape(w, -1) for p in parts], axis=1)
  conv_b = np.concatenate([m[p]["bias"].reshape(-1) for p in parts])
  return {
      prefix + "norm.weight": block["norm"]["scale"],
      prefix + "mixer.in_proj.weight": in_proj,
      prefix + "mixer.conv1d.weight": conv_w.T[:, None, :],
      prefix + "mixer.conv1d.bias": conv_b,
      prefix + "mixer.dt_bias": m["dt_bias"], prefix + "mixer.A_log": m["A_log"],
      prefix + "mixer.D": m["D"],
      prefix + "mixer.norm.weight": m["norm"]["scale"].reshape(-1),
      prefix + "mixer.out_proj.weight": m["out"]["kernel"].reshape(-1, e).T,
  }


def params_from_hf(tensors: dict[str, np.ndarray], cfg: MambaConfig) -> dict:
  """HF state dict -> plain Treadle params (see hf_backbone.params_from_hf)."""
  return hf_backbone.params_from_hf(tensors, cfg, _block_from_hf)


def hf_from_params(params, cfg: MambaConfig) -> dict[str, np.ndarray]:
  """Treadle params -> HF state dict of float32 arrays (see hf_backbone.hf_from_params)."""
  return hf_backbone.hf_from_params(params, cfg, _block_to_hf)


MAMBA2 = hf_backbone.converter("a transformers Mamba2ForCausalLM save_pretrained directory",
                               model_config_from_hf, hf_config_from_model, _block_from_hf,
                               _block_to_hf)
