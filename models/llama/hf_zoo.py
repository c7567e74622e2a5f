"""The dense decoders researchers download, as settings of Treadle's Llama: HF checkpoint
conversion for Qwen2/2.5, Qwen3, Mistral and Gemma 3 (text).

Each format only translates config.json; the tensors go through the shared
tables of models/llama/hf.py (`dense_block_tensors`). What each adds to Llama:

  qwen2    Qwen2ForCausalLM: q/k/v biases (model.qkv_bias); tied on small sizes.
  qwen3    Qwen3ForCausalLM: per-head q/k RMSNorm before RoPE (model.qk_norm).
  mistral  MistralForCausalLM: sliding-window attention (model.sliding_window).
  gemma3   Gemma3ForCausalLM (text only): GeGLU, (1 + w) norms, pre- and
           post-norms, sqrt(e)-scaled embeddings, q/k norms,
           query_pre_attn_scalar, local layers with their own RoPE base
           interleaved with global ones, final logit soft-capping.

Each reader refuses an HF feature it does not map (naming the HF field); each
writer refuses a Treadle field the format cannot hold (naming `model.<field>`).
Pure numpy: no torch, no transformers.
"""

from collections.abc import Callable
from typing import NamedTuple

from models import hf_io
from models.family import Converter
from models.llama import hf as llama_hf
from models.llama.config import LlamaConfig


class DenseFormat(NamedTuple):
  """One HF dense-decoder format: how its config.json maps to `config.model`."""
  model_type: str  # HF config.json model_type.
  architecture: str  # The transformers class, e.g. 'Qwen3ForCausalLM'.
  fields_from_hf: Callable[[dict], dict]  # config.json dict -> config.model fields.
  hf_config: Callable[[LlamaConfig], dict]  # LlamaConfig -> config.json dict.


def _refuse(hf_config: dict, key: str, ok: bool, want: str) -> None:
  if not ok:
    raise ValueError(f"HF {key}={hf_config.get(key)!r} is not supported; Treadle needs {want}.")


def _require(cfg: LlamaConfig, name: str, want, format_name: str) -> None:
  if getattr(cfg, name) != want:
    raise ValueError(f"model.{name}={getattr(cfg, name)!r}, but {format_name} always has "
                     f"{want!r}: export to another format (llama, qwen2, qwen3, mistral).")


def _check_model_type(hf_config: dict, model_type: str) -> None:
  found = hf_config.get("model_type")
  if found != model_type:
    raise ValueError(f"HF model_type={found!r}; this converter reads {model_type!r}.")


def _common_fields(hf_config: dict, *, bias_key: str | None = "attention_bias") -> dict:
  if bias_key:
    _refuse(hf_config, bias_key, not hf_config.get(bias_key, False), "False")
  _refuse(hf_config, "mlp_bias", not hf_config.get("mlp_bias", False), "False")
  fields = llama_hf.decoder_fields_from_hf(hf_config)
  fields["mlp_dim"] = int(hf_config["intermediate_size"])
  return fields


def _no_qwen_window(hf_config: dict) -> None:
  _refuse(hf_config, "use_sliding_window", not hf_config.get("use_sliding_window", False),
          "False (Qwen windows only some layers)")


def _qwen_json(cfg: LlamaConfig) -> dict:
  return {"intermediate_size": cfg.mlp_dim, "use_sliding_window": False,
          "sliding_window": None, "max_window_layers": cfg.num_layers}


# Qwen2 / Qwen2.5: Llama with q/k/v biases (no o_proj bias).
def qwen2_fields(hf_config: dict) -> dict:
  _check_model_type(hf_config, "qwen2")
  _no_qwen_window(hf_config)
  return {**_common_fields(hf_config, bias_key=None), "qkv_bias": True}


def qwen2_hf_config(cfg: LlamaConfig) -> dict:
  _require(cfg, "qkv_bias", True, "HF Qwen2")
  return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
          **llama_hf.hf_decoder_config(cfg, "HF Qwen2"), **_qwen_json(cfg)}


# Qwen3: Llama with q/k RMSNorm (no biases).
def qwen3_fields(hf_config: dict) -> dict:
  _check_model_type(hf_config, "qwen3")
  _no_qwen_window(hf_config)
  return {**_common_fields(hf_config), "qk_norm": True}


def qwen3_hf_config(cfg: LlamaConfig) -> dict:
  _require(cfg, "qk_norm", True, "HF Qwen3")
  _require(cfg, "qkv_bias", False, "HF Qwen3")
  return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
          **llama_hf.hf_decoder_config(cfg, "HF Qwen3", allowed=("qk_norm",)),
          **_qwen_json(cfg), "attention_bias": False}


# Mistral: Llama with a sliding window on every layer.
def mistral_fields(hf_config: dict) -> dict:
  _check_model_type(hf_config, "mistral")
  return {**_common_fields(hf_config, bias_key=None),
          "sliding_window": int(hf_config.get("sliding_window") or 0)}


def mistral_hf_config(cfg: LlamaConfig) -> dict:
  _require(cfg, "qkv_bias", False, "HF Mistral")
  return {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
          **llama_hf.hf_decoder_config(cfg, "HF Mistral", allowed=("sliding_window",)),
          "intermediate_size": cfg.mlp_dim, "sliding_window": cfg.sliding_window or None}


# Gemma 3 (text).
_GEMMA_FIXED = dict(qk_norm=True, norm_plus_one=True, post_norms=True,
                    mlp_activation="gelu_tanh", embed_scale=True, qkv_bias=False)
_GEMMA_ALLOWED = ("qk_norm", "norm_plus_one", "post_norms", "mlp_activation", "embed_scale",
                  "query_pre_attn_scalar", "sliding_window", "global_every", "local_rope_theta",
                  "final_logit_softcap")


def _global_every(layer_types: list[str]) -> tuple[bool, int]:
  """(any sliding layer, n) with layers n, 2n, ... global; raises for other patterns."""
  full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
  if len(full) == len(layer_types):
    return False, 0
  if not full:
    return True, 0
  n = full[0] + 1
  if any((kind == "full_attention") != ((i + 1) % n == 0) for i, kind in enumerate(layer_types)):
    raise ValueError(f"HF layer_types={layer_types} is not 'every n-th layer global'; "
                     "Treadle's model.global_every cannot express it.")
  return True, n


def gemma3_fields(hf_config: dict) -> dict:
  _check_model_type(hf_config, "gemma3_text")
  activation = hf_config.get("hidden_activation") or hf_config.get("hidden_act")
  _refuse(hf_config, "hidden_activation", activation in ("gelu_pytorch_tanh", "gelu_tanh"),
          "'gelu_pytorch_tanh'")
  _refuse(hf_config, "attn_logit_softcapping", hf_config.get("attn_logit_softcapping") is None,
          "None")
  _refuse(hf_config, "use_bidirectional_attention",
          not hf_config.get("use_bidirectional_attention", False), "False")
  rope = hf_config.get("rope_parameters") or {}
  full_rope = rope.get("full_attention", {"rope_type": "default", "rope_theta": 1e6})
  local_rope = rope.get("sliding_attention", {"rope_type": "default", "rope_theta": 1e4})
  if local_rope.get("rope_type", "default") != "default":
    raise ValueError(f"HF rope_parameters.sliding_attention={local_rope} is not supported; "
                     "Treadle's local layers use plain RoPE (rope_type 'default').")
  plain = {k: v for k, v in hf_config.items() if k not in ("hidden_act", "hidden_activation")}
  plain.update(rope_parameters=full_rope, rope_theta=full_rope.get("rope_theta", 1e6))
  fields = _common_fields(plain)
  fields["tie_embeddings"] = bool(hf_config.get("tie_word_embeddings", True))
  layer_types = hf_config.get("layer_types") or [
      "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
      for i in range(fields["num_layers"])]
  any_local, every = _global_every(layer_types)
  fields.update(_GEMMA_FIXED)
  fields.update(
      query_pre_attn_scalar=float(hf_config.get("query_pre_attn_scalar") or 0.0),
      sliding_window=int(hf_config["sliding_window"]) if any_local else 0,
      global_every=every,
      local_rope_theta=float(local_rope.get("rope_theta", 1e4)) if any_local else 0.0,
      final_logit_softcap=float(hf_config.get("final_logit_softcapping") or 0.0),
      scan_layers=not every)
  return fields


def _int_if_whole(value: float):
  return int(value) if float(value).is_integer() else value  # transformers types it int.


def gemma3_hf_config(cfg: LlamaConfig) -> dict:
  for name, want in _GEMMA_FIXED.items():
    _require(cfg, name, want, "HF Gemma 3")
  out = llama_hf.hf_decoder_config(cfg, "HF Gemma 3", allowed=_GEMMA_ALLOWED)
  del out["hidden_act"], out["rope_theta"]
  layer_types = ["sliding_attention" if cfg.layer_is_local(i) else "full_attention"
                 for i in range(cfg.num_layers)]
  local_theta = cfg.local_rope_theta or cfg.rope_theta
  local_rope = (llama_hf.hf_rope_parameters(local_theta, cfg.rope_scaling)
                if not cfg.local_rope_theta else {"rope_type": "default",
                                                  "rope_theta": local_theta})
  out.update(
      architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
      intermediate_size=cfg.mlp_dim, hidden_activation="gelu_pytorch_tanh",
      query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
      sliding_window=cfg.sliding_window or None, layer_types=layer_types,
      rope_parameters={"full_attention": out["rope_parameters"], "sliding_attention": local_rope},
      final_logit_softcapping=cfg.final_logit_softcap or None, attn_logit_softcapping=None,
      attention_bias=False, use_bidirectional_attention=False)
  return out


def converter(fmt: DenseFormat) -> Converter:
  """The `train.convert` Converter of a dense format."""
  def read(hf_dir: str) -> tuple[LlamaConfig, dict]:
    hf_config, tensors = hf_io.read_hf_dir(hf_dir)
    cfg = LlamaConfig.from_dict(fmt.fields_from_hf(hf_config))
    return cfg, llama_hf.params_from_hf(tensors, cfg, fmt.architecture)

  def write(hf_dir: str, cfg: LlamaConfig, variables: dict) -> list[str]:
    hf_config = fmt.hf_config(cfg)  # Checks first: nothing written if unexportable.
    return hf_io.write_hf_dir(hf_dir, hf_config,
                              llama_hf.hf_from_params(variables["params"], cfg))

  return Converter(f"a transformers {fmt.architecture} save_pretrained directory", read, write)


FORMATS = {
    "qwen2": DenseFormat("qwen2", "Qwen2ForCausalLM", qwen2_fields, qwen2_hf_config),
    "qwen3": DenseFormat("qwen3", "Qwen3ForCausalLM", qwen3_fields, qwen3_hf_config),
    "mistral": DenseFormat("mistral", "MistralForCausalLM", mistral_fields, mistral_hf_config),
    "gemma3": DenseFormat("gemma3_text", "Gemma3ForCausalLM", gemma3_fields, gemma3_hf_config),
}
CONVERTERS = {name: converter(fmt) for name, fmt in FORMATS.items()}
