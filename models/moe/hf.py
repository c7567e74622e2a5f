"""Conversion between HF `MixtralForCausalLM` / `Qwen2MoeForCausalLM` checkpoints and Treadle MoE.

Pure numpy: no torch, no transformers. Attention, norms and embeddings convert
as for Llama (models/llama/hf.py). transformers 5 fuses the experts in memory
but `save_pretrained` writes (and `from_pretrained` reads) one tensor per
expert, and that per-expert layout is what these converters read and write:

  Mixtral   model.layers.{i}.block_sparse_moe.gate.weight [E, e]
            model.layers.{i}.block_sparse_moe.experts.{j}.w1 / w3 / w2.weight
              (gate [m, e] / up [m, e] / down [e, m])
  Qwen2-MoE model.layers.{i}.mlp.gate.weight [E, e]
            model.layers.{i}.mlp.experts.{j}.gate_proj / up_proj / down_proj.weight
            model.layers.{i}.mlp.shared_expert.gate_proj / up_proj / down_proj.weight
            model.layers.{i}.mlp.shared_expert_gate.weight [1, e]
            model.layers.{i}.self_attn.q_proj / k_proj / v_proj.bias
            dense layers (mlp_only_layers): model.layers.{i}.mlp.gate_proj ... .weight

Treadle side (see models/moe/model.py), per layer i: moe/router/kernel [e, E],
moe/experts/gate and up [E, e, m], moe/experts/down [E, m, e],
moe/shared/{gate,up,down}/kernel, moe/shared_gate/kernel [e, 1]; the first
`moe.first_dense_layers` layers have mlp/{gate,up,down}/kernel instead. Unrolled
as layers_{i}, or with scan_layers stacked with a leading layer axis under
dense_layers (the dense layers) and moe_layers (the rest).

Neither HF family has DeepSeek's selection bias: imports start it at zero
(the export refuses a nonzero one). Configs an HF family
cannot express (sigmoid or group-limited routing, scaled gates, and for
Mixtral shared experts, dense layers or q/k/v biases) are refused both ways.

Shapes (layers/__init__.py): e embed, v vocab, E experts, m expert mlp, L layers.
"""

import dataclasses

import jax
import numpy as np

from models import hf_io
from models.family import Converter
from models.llama import hf as llama_hf
from models.llama.hf import HfTensor
from models.moe.config import MoeConfig


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where one HF family keeps a layer's MoE tensors, under model.layers.{i}."""
  name: str  # For messages.
  router: str  # The [E, e] router weight.
  expert: str  # One expert's prefix, with {j} for its index.
  expert_names: tuple[str, str, str]  # The gate, up and down projections within an expert.
  shared: str  # Shared expert prefix ('' = none in this family).
  shared_gate: str  # Shared expert's [1, e] sigmoid gate ('' = none).


_MIXTRAL = _Layout("Mixtral", "block_sparse_moe.gate.weight", "block_sparse_moe.experts.{j}.",
                   ("w1", "w3", "w2"), "", "")
_QWEN2_MOE = _Layout("Qwen2-MoE", "mlp.gate.weight", "mlp.experts.{j}.",
                     ("gate_proj", "up_proj", "down_proj"), "mlp.shared_expert.",
                     "mlp.shared_expert_gate.weight")
_DENSE_PREFIX = "mlp."  # Dense (first_dense_layers) SwiGLU in both families.


def _require(hf_config: dict, field: str, ok: bool, want: str) -> None:
  if not ok:
    raise ValueError(f"HF {field}={hf_config.get(field)!r}; Treadle's MoE needs {want}.")


def _moe_fields(hf_config: dict, *, num_experts: str, expert_mlp_dim: str) -> dict:
  """Fields shared by both families, with routing as Mixtral does it."""
  fields = llama_hf.decoder_fields_from_hf(hf_config)
  fields.update(mlp_dim=int(hf_config["intermediate_size"]), qkv_bias=False)
  fields["moe"] = dict(
      num_experts=int(hf_config[num_experts]),
      num_experts_per_token=int(hf_config["num_experts_per_tok"]),
      expert_mlp_dim=int(hf_config[expert_mlp_dim]),
      shared_expert_mlp_dim=0,
      shared_expert_gate=False,
      router="softmax",
      router_norm_topk=True,
      router_num_groups=1,
      router_topk_groups=1,
      routed_scaling_factor=1.0,
      first_dense_layers=0,
      impl="dropless",  # HF computes every routed token.
  )
  return fields


def mixtral_config_from_hf(hf_config: dict) -> dict:
  """`config.model` field values (`moe` nested) from an HF Mixtral config.json dict.

  Raises:
    ValueError: naming the HF field of a feature Treadle does not implement
      (sliding_window, router_jitter_noise, a non-SiLU activation, RoPE scaling).
  """
  _require(hf_config, "model_type", hf_config.get("model_type") == "mixtral", "'mixtral'")
  _require(hf_config, "sliding_window", hf_config.get("sliding_window") is None,
           "None (no sliding-window attention)")
  _require(hf_config, "router_jitter_noise", not hf_config.get("router_jitter_noise", 0.0), "0")
  return _moe_fields(hf_config, num_experts="num_local_experts",
                     expert_mlp_dim="intermediate_size")


def qwen2_moe_config_from_hf(hf_config: dict) -> dict:
  """`config.model` field values from an HF Qwen2-MoE config.json dict.

  mlp_only_layers may list the first k layers (they become first_dense_layers);
  every other layer must be sparse (decoder_sparse_step 1).

  Raises:
    ValueError: naming the HF field of a layout Treadle does not implement
      (decoder_sparse_step, mlp_only_layers, use_sliding_window, ...).
  """
  _require(hf_config, "model_type", hf_config.get("model_type") == "qwen2_moe", "'qwen2_moe'")
  _require(hf_config, "decoder_sparse_step", hf_config.get("decoder_sparse_step", 1) == 1, "1")
  dense = sorted(hf_config.get("mlp_only_layers") or [])
  _require(hf_config, "mlp_only_layers", dense == list(range(len(dense))),
           "[] or the first k layers [0, ..., k-1]")
  _require(hf_config, "use_sliding_window", not hf_config.get("use_sliding_window", False),
           "False")
  layer_types = hf_config.get("layer_types") or []
  _require(hf_config, "layer_types", set(layer_types) <= {"full_attention"},
           "only 'full_attention'")
  _require(hf_config, "shared_expert_intermediate_size",
           int(hf_config.get("shared_expert_intermediate_size", 0)) > 0, "a positive width")
  fields = _moe_fields(hf_config, num_experts="num_experts",
                       expert_mlp_dim="moe_intermediate_size")
  fields["moe"].update(
      shared_expert_mlp_dim=int(hf_config["shared_expert_intermediate_size"]),
      shared_expert_gate=True,
      router_norm_topk=bool(hf_config.get("norm_topk_prob", False)),
      first_dense_layers=len(dense),
  )
  fields["qkv_bias"] = bool(hf_config.get("qkv_bias", True))  # Before transformers 5: always.
  return fields


def _check_representable(cfg: MoeConfig, layout: _Layout) -> None:
  """Raises ValueError naming each model field HF `layout` cannot express."""
  problems, m = [], cfg.moe
  if m.router != "softmax":
    problems.append(f"model.moe.router={m.router!r} (HF: 'softmax')")
  if m.router_num_groups != 1 or m.router_topk_groups != 1:
    problems.append(f"model.moe.router_num_groups={m.router_num_groups}, "
                    f"router_topk_groups={m.router_topk_groups} (HF: 1)")
  if m.routed_scaling_factor != 1.0:
    problems.append(f"model.moe.routed_scaling_factor={m.routed_scaling_factor} (HF: 1.0)")
  if layout is _MIXTRAL:
    if not m.router_norm_topk:
      problems.append("model.moe.router_norm_topk=False (Mixtral: True)")
    if m.shared_expert_mlp_dim:
      problems.append(f"model.moe.shared_expert_mlp_dim={m.shared_expert_mlp_dim} (Mixtral: 0)")
    if m.first_dense_layers:
      problems.append(f"model.moe.first_dense_layers={m.first_dense_layers} (Mixtral: 0)")
    if cfg.qkv_bias:
      problems.append("model.qkv_bias=True (Mixtral: False)")
  else:
    if not m.shared_expert_mlp_dim or not m.shared_expert_gate:
      problems.append(f"model.moe.shared_expert_mlp_dim={m.shared_expert_mlp_dim}, "
                      f"shared_expert_gate={m.shared_expert_gate} (Qwen2-MoE: a gated "
                      "shared expert)")
  if problems:
    raise ValueError(f"HF {layout.name} cannot express " + "; ".join(problems) + ".")


def hf_mixtral_config(cfg: MoeConfig) -> dict:
  """A config.json dict that transformers' `MixtralForCausalLM` loads (float32 weights)."""
  _check_representable(cfg, _MIXTRAL)
  return {
      "architectures": ["MixtralForCausalLM"],
      "model_type": "mixtral",
      **llama_hf.hf_decoder_config(cfg),
      "intermediate_size": cfg.moe.expert_mlp_dim,
      "num_local_experts": cfg.moe.num_experts,
      "num_experts_per_tok": cfg.moe.num_experts_per_token,
      "sliding_window": None,
      "router_jitter_noise": 0.0,
      "output_router_logits": False,
  }


def hf_qwen2_moe_config(cfg: MoeConfig) -> dict:
  """A config.json dict that transformers' `Qwen2MoeForCausalLM` loads (float32 weights)."""
  _check_representable(cfg, _QWEN2_MOE)
  return {
      "architectures": ["Qwen2MoeForCausalLM"],
      "model_type": "qwen2_moe",
      **llama_hf.hf_decoder_config(cfg),
      "intermediate_size": cfg.mlp_dim,
      "moe_intermediate_size": cfg.moe.expert_mlp_dim,
      "shared_expert_intermediate_size": cfg.moe.shared_expert_mlp_dim,
      "num_experts": cfg.moe.num_experts,
      "num_experts_per_tok": cfg.moe.num_experts_per_token,
      "norm_topk_prob": cfg.moe.router_norm_topk,
      "decoder_sparse_step": 1,
      "mlp_only_layers": list(range(cfg.moe.first_dense_layers)),
      "qkv_bias": cfg.qkv_bias,
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": cfg.num_layers,
      "layer_types": ["full_attention"] * cfg.num_layers,
      "output_router_logits": False,
  }


def _layer_tensors(cfg: MoeConfig, layout: _Layout, i: int) -> tuple[HfTensor, ...]:
  """Layer i's tensors except the routed experts (read and stacked separately)."""
  e = cfg.embed_dim
  specs = llama_hf.attention_tensors(cfg, cfg.qkv_bias)
  if i < cfg.moe.first_dense_layers:
    return specs + llama_hf.swiglu_tensors(("mlp",), _DENSE_PREFIX, e, cfg.mlp_dim)
  specs += (HfTensor(("moe", "router", "kernel"), layout.router, "linear", (cfg.moe.num_experts, e)),)
  if cfg.moe.shared_expert_mlp_dim:
    specs += llama_hf.swiglu_tensors(("moe", "shared"), layout.shared, e,
                                     cfg.moe.shared_expert_mlp_dim)
  if cfg.moe.shared_expert_gate:
    specs += (HfTensor(("moe", "shared_gate", "kernel"), layout.shared_gate, "linear", (1, e)),)
  return specs


def _expert_tensors(cfg: MoeConfig, layout: _Layout, j: int) -> tuple[HfTensor, ...]:
  """Expert j's gate/up/down as 'linear' tensors; paths name the stacked Treadle arrays."""
  specs = llama_hf.swiglu_tensors(("moe", "experts"), layout.expert.format(j=j), cfg.embed_dim,
                                  cfg.moe.expert_mlp_dim, names=layout.expert_names)
  return tuple(spec._replace(path=spec.path[:-1]) for spec in specs)  # Drop 'kernel'.


def _params_from_hf(tensors: dict[str, np.ndarray], cfg: MoeConfig, layout: _Layout) -> dict:
  """HF state dict -> plain Treadle MoE params in `param_dtype` (see the module docstring)."""
  _check_representable(cfg, layout)
  reader = llama_hf.TensorReader(tensors)
  blocks = []
  for i in range(cfg.num_layers):
    prefix = f"model.layers.{i}."
    block = reader.block(prefix, _layer_tensors(cfg, layout, i), cfg)
    if i >= cfg.moe.first_dense_layers:
      experts = [reader.block(prefix, _expert_tensors(cfg, layout, j), cfg)
                 for j in range(cfg.moe.num_experts)]
      block["moe"]["experts"] = jax.tree.map(lambda *ws: np.stack(ws), *experts)["moe"]["experts"]
    blocks.append(block)
  params = reader.embeddings(cfg)
  if cfg.scan_layers:
    for name, group in (("dense_layers", blocks[:cfg.moe.first_dense_layers]),
                        ("moe_layers", blocks[cfg.moe.first_dense_layers:])):
      if group:
        params[name] = jax.tree.map(lambda *ws: np.stack(ws), *group)
  else:
    params.update({f"layers_{i}": block for i, block in enumerate(blocks)})
  reader.check_all_used(f"MoE (as HF {layout.name})")
  return llama_hf.as_numpy(params, np.dtype(jax.numpy.dtype(cfg.param_dtype)))


def _hf_from_params(params, cfg: MoeConfig, layout: _Layout) -> dict[str, np.ndarray]:
  """Treadle MoE params (boxed or plain, any device) -> HF state dict of float32 arrays."""
  _check_representable(cfg, layout)
  params = llama_hf.as_numpy(params, np.float32)
  out = llama_hf.embeddings_to_hf(params, cfg)
  for i in range(cfg.num_layers):
    if cfg.scan_layers:
      dense = i < cfg.moe.first_dense_layers
      index = i if dense else i - cfg.moe.first_dense_layers
      group = params["dense_layers" if dense else "moe_layers"]
      block = jax.tree.map(lambda w, index=index: w[index], group)
    else:
      block = params[f"layers_{i}"]
    prefix = f"model.layers.{i}."
    out.update(llama_hf.block_to_hf(block, prefix, _layer_tensors(cfg, layout, i)))
    if i >= cfg.moe.first_dense_layers:
      for j in range(cfg.moe.num_experts):
        expert = jax.tree.map(lambda w, j=j: w[j], block["moe"]["experts"])
        out.update(llama_hf.block_to_hf({"moe": {"experts": expert}}, prefix,
                                        _expert_tensors(cfg, layout, j)))
  return {name: np.ascontiguousarray(w) for name, w in out.items()}


def mixtral_params_from_hf(tensors: dict[str, np.ndarray], cfg: MoeConfig) -> dict:
  """HF Mixtral state dict -> plain Treadle params; ValueError names a bad or unused tensor."""
  return _params_from_hf(tensors, cfg, _MIXTRAL)


def qwen2_moe_params_from_hf(tensors: dict[str, np.ndarray], cfg: MoeConfig) -> dict:
  """HF Qwen2-MoE state dict -> plain Treadle params; ValueError names a bad or unused tensor."""
  return _params_from_hf(tensors, cfg, _QWEN2_MOE)


def hf_mixtral_from_params(params, cfg: MoeConfig) -> dict[str, np.ndarray]:
  """Treadle params -> the per-expert HF Mixtral state dict that from_pretrained reads."""
  return _hf_from_params(params, cfg, _MIXTRAL)


def hf_qwen2_moe_from_params(params, cfg: MoeConfig) -> dict[str, np.ndarray]:
  """Treadle params -> the per-expert HF Qwen2-MoE state dict that from_pretrained reads."""
  return _hf_from_params(params, cfg, _QWEN2_MOE)


def _converter(layout: _Layout, config_from_hf, hf_config_from_model) -> Converter:
  """The transformers directory format of one HF MoE family."""

  def read(hf_dir: str) -> tuple[MoeConfig, dict]:
    hf_config, tensors = hf_io.read_hf_dir(hf_dir)
    cfg = MoeConfig.from_dict(config_from_hf(hf_config))
    return cfg, _params_from_hf(tensors, cfg, layout)

  def write(hf_dir: str, cfg: MoeConfig, variables: dict) -> list[str]:
    if any(np.any(np.asarray(b)) for b in jax.tree.leaves(variables.get("balance", {}))):
      raise ValueError(f"The MoE selection biases ('balance') are nonzero and HF "
                       f"{layout.name} has no place for them.")
    return hf_io.write_hf_dir(hf_dir, hf_config_from_model(cfg),
                              _hf_from_params(variables["params"], cfg, layout))

  architecture = {"Mixtral": "MixtralForCausalLM", "Qwen2-MoE": "Qwen2MoeForCausalLM"}
  return Converter(f"a transformers {architecture[layout.name]} save_pretrained directory",
                   read, write)


MIXTRAL = _converter(_MIXTRAL, mixtral_config_from_hf, hf_mixtral_config)
QWEN2_MOE = _converter(_QWEN2_MOE, qwen2_moe_config_from_hf, hf_qwen2_moe_config)
