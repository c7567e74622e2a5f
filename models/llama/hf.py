"""Conversion between Hugging Face `LlamaForCausalLM` checkpoints and Treadle Llama params.

The shared pieces (attention, norms, embeddings, SwiGLU tables, RoPE scaling,
the tensor reader) also serve the dense variants in models/llama/hf_zoo.py
(Qwen2, Qwen3, Mistral, Gemma 3) and the MoE converters in models/moe/hf.py.
Pure numpy: no torch, no transformers. HF stores linear weights as [out, in];
Treadle kernels are [in, out] with heads split out. Both use the rotate-half
RoPE layout, so q/k need no permutation.

Shapes (layers/__init__.py): e embed, v vocab, h heads, k kv heads, d head dim, m mlp,
L layers.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from models import hf_io
from models.family import Converter
from models.llama.config import LlamaConfig, RopeScalingConfig

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# LlamaConfig fields of the dense variants, with their plain-Llama values; an
# exporter names the ones its format can hold (see `check_variant_fields`).
VARIANT_FIELDS = dict(qk_norm=False, norm_plus_one=False, post_norms=False,
                      mlp_activation="silu", embed_scale=False, query_pre_attn_scalar=0.0,
                      sliding_window=0, global_every=0, local_rope_theta=0.0,
                      final_logit_softcap=0.0)


class HfTensor(NamedTuple):
  """One HF tensor of a decoder block and where it lives in the Treadle block."""
  path: tuple[str, ...]  # Under the Treadle block, e.g. ('attn', 'query', 'kernel').
  name: str  # Under model.layers.{i}, e.g. 'self_attn.q_proj.weight'.
  kind: str  # How the layouts differ: see `to_treadle`.
  shape: tuple[int, ...]  # The HF shape.


def attention_tensors(cfg, qkv_bias: bool = False) -> tuple[HfTensor, ...]:
  """Attention projections (q/k/v biases when `qkv_bias`) and both block norms.

  `cfg` is any model config with embed_dim, num_heads, num_kv_heads, head_dim.
  """
  e, hd, kd = cfg.embed_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  tensors = (
      HfTensor(("attn", "query", "kernel"), "self_attn.q_proj.weight", "heads_in", (hd, e)),
      HfTensor(("attn", "key", "kernel"), "self_attn.k_proj.weight", "kv_heads_in", (kd, e)),
      HfTensor(("attn", "value", "kernel"), "self_attn.v_proj.weight", "kv_heads_in", (kd, e)),
      HfTensor(("attn", "out", "kernel"), "self_attn.o_proj.weight", "heads_out", (e, hd)),
      HfTensor(("attn_norm", "scale"), "input_layernorm.weight", "vector", (e,)),
      HfTensor(("mlp_norm", "scale"), "post_attention_layernorm.weight", "vector", (e,)),
  )
  if qkv_bias:
    tensors += (
        HfTensor(("attn", "query", "bias"), "self_attn.q_proj.bias", "heads_bias", (hd,)),
        HfTensor(("attn", "key", "bias"), "self_attn.k_proj.bias", "kv_heads_bias", (kd,)),
        HfTensor(("attn", "value", "bias"), "self_attn.v_proj.bias", "kv_heads_bias", (kd,)),
    )
  return tensors


def swiglu_tensors(path: tuple[str, ...], prefix: str, embed_dim: int, mlp_dim: int,
                   names=("gate_proj", "up_proj", "down_proj")) -> tuple[HfTensor, ...]:
  """A SwiGLU under Treadle `path` ({gate,up,down}/kernel) and HF `prefix` (e.g. 'mlp.')."""
  e, m = embed_dim, mlp_dim
  return tuple(HfTensor(path + (ours, "kernel"), f"{prefix}{theirs}.weight", "linear", shape)
               for ours, theirs, shape in zip(("gate", "up", "down"), names,
                                              ((m, e), (m, e), (e, m))))


def check_variant_fields(cfg, format_name: str, allowed=()) -> None:
  """Raises ValueError naming the first variant field (VARIANT_FIELDS) that `cfg` sets
  and `format_name` cannot hold; `allowed` lists the ones it can."""
  for name, plain in VARIANT_FIELDS.items():
    if name not in allowed and getattr(cfg, name) != plain:
      raise ValueError(f"model.{name}={getattr(cfg, name)!r} has no {format_name} equivalent "
                       f"(it needs {plain!r}); export to a format that has it.")


_HF_ROPE_KEYS = dict(factor="factor", original_context="original_max_position_embeddings",
                     low_freq_factor="low_freq_factor", high_freq_factor="high_freq_factor",
                     beta_fast="beta_fast", beta_slow="beta_slow",
                     attention_factor="attention_factor", mscale="mscale",
                     mscale_all_dim="mscale_all_dim", truncate="truncate")
_HF_ROPE_FIELDS = dict(linear=("factor",), dynamic=("factor",),
                       llama3=("factor", "original_context", "low_freq_factor",
                               "high_freq_factor"),
                       yarn=("factor", "original_context", "beta_fast", "beta_slow",
                             "attention_factor", "mscale", "mscale_all_dim", "truncate"))


def rope_from_hf(rope: dict, max_position_embeddings: int) -> tuple[float | None, dict]:
  """(rope_theta or None, `model.rope_scaling` fields) from an HF rope_parameters /
  rope_scaling dict.

  Raises:
    ValueError: naming an HF RoPE type Treadle does not implement (e.g. longrope).
  """
  rope = dict(rope or {})
  kind = rope.get("rope_type", rope.get("type", "default"))
  theta = rope.get("rope_theta")
  if kind == "default":
    return theta, {"kind": "none"}
  if kind not in _HF_ROPE_FIELDS:
    raise ValueError(f"HF RoPE type {kind!r} is not supported; Treadle implements "
                     f"'default' and {sorted(_HF_ROPE_FIELDS)}.")
  fields = {"kind": kind}
  for name in _HF_ROPE_FIELDS[kind]:
    value = rope.get(_HF_ROPE_KEYS[name])
    if value is not None:
      fields[name] = value
  if kind == "dynamic":  # transformers scales from max_position_embeddings.
    fields["original_context"] = int(max_position_embeddings)
  if kind == "yarn" and "factor" not in fields:
    fields["factor"] = max_position_embeddings / fields["original_context"]
  defaults = RopeScalingConfig()
  return theta, {k: type(getattr(defaults, k))(v) for k, v in fields.items()}


def hf_rope_parameters(theta: float, scaling: RopeScalingConfig) -> dict:
  """The HF rope_parameters dict of base `theta` and `scaling`."""
  if scaling.kind == "none":
    return {"rope_type": "default", "rope_theta": theta}
  out = {"rope_type": scaling.kind, "rope_theta": theta}
  for name in _HF_ROPE_FIELDS[scaling.kind]:
    value = getattr(scaling, name)
    if name == "attention_factor" and not value:
      continue  # transformers derives it, as Treadle does.
    if name in ("mscale", "mscale_all_dim") and not value:
      continue
    out[_HF_ROPE_KEYS[name]] = value
  return out


def decoder_fields_from_hf(hf_config: dict) -> dict:
  """The `config.model` fields every Llama-like HF decoder shares.

  Returns vocab_size, embed_dim, num_layers, num_heads, num_kv_heads, head_dim,
  max_seq_len, rope_theta, norm_eps, tie_embeddings and, for scaled RoPE,
  rope_scaling (a nested dict).

  Raises:
    ValueError: for a non-SiLU activation or an unsupported RoPE type (longrope).
  """
  if hf_config.get("hidden_act", "silu") != "silu":
    raise ValueError(f"HF hidden_act={hf_config['hidden_act']!r}; only 'silu' is supported.")
  max_len = int(hf_config.get("max_position_embeddings", 2048))
  rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
  rope_theta, rope_scaling = rope_from_hf(rope, max_len)
  theta = hf_config.get("rope_theta", rope_theta if rope_theta is not None else 10_000.0)
  num_heads = int(hf_config["num_attention_heads"])
  head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads
  fields = dict(
      vocab_size=int(hf_config["vocab_size"]),
      embed_dim=int(hf_config["hidden_size"]),
      num_layers=int(hf_config["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=int(hf_config.get("num_key_value_heads") or num_heads),
      head_dim=int(head_dim),
      max_seq_len=max_len,
      rope_theta=float(theta),
      norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
  )
  if rope_scaling["kind"] != "none":
    fields["rope_scaling"] = rope_scaling  # A nested section: build with LlamaConfig.from_dict.
  return fields


def hf_decoder_config(cfg, format_name: str = "HF Llama-like", allowed=()) -> dict:
  """The config.json entries every Llama-like HF decoder shares (float32 weights).

  Raises:
    ValueError: if `cfg` sets a variant field (VARIANT_FIELDS) not in `allowed`.
  """
  check_variant_fields(cfg, format_name, allowed)
  max_len = cfg.max_seq_len
  if cfg.rope_scaling.kind == "dynamic":  # transformers scales from max_position_embeddings.
    max_len = cfg.rope_scaling.original_context
  return {
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": max_len,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": hf_rope_parameters(cfg.rope_theta, cfg.rope_scaling),
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "torch_dtype": "float32",
      "dtype": "float32",
  }


def model_config_from_hf(hf_config: dict) -> dict:
  """`config.model` field values read from an HF Llama config.json dict.

  Returns vocab_size, embed_dim, num_layers, num_heads, num_kv_heads, head_dim,
  mlp_dim, max_seq_len, rope_theta, norm_eps, tie_embeddings and, for scaled
  RoPE, rope_scaling (a nested dict).

  Raises:
    ValueError: for features Treadle's Llama does not implement (biases, a
      non-SiLU activation, RoPE types such as 'longrope').
  """
  model_type = hf_config.get("model_type", "llama")
  if model_type != "llama":
    raise ValueError(f"HF model_type={model_type!r}; this converter handles 'llama'.")
  for flag in ("attention_bias", "mlp_bias"):
    if hf_config.get(flag, False):
      raise ValueError(f"HF {flag}=True; Treadle's Llama has no biases.")
  fields = decoder_fields_from_hf(hf_config)
  fields["mlp_dim"] = int(hf_config["intermediate_size"])
  return fields


def _check_exportable(cfg: LlamaConfig) -> None:
  if cfg.qkv_bias:
    raise ValueError("model.qkv_bias=True has no HF Llama equivalent (attention_bias also adds "
                     "an o_proj bias): export with --model=qwen2.")
  check_variant_fields(cfg, "HF Llama")


def hf_config_from_model(cfg: LlamaConfig) -> dict:
  """A config.json dict that transformers' `LlamaForCausalLM` loads (float32 weights).

  Raises:
    ValueError: if cfg.qkv_bias (HF Llama's attention_bias also biases o_proj).
  """
  _check_exportable(cfg)
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      **hf_decoder_config(cfg, "HF Llama"),
      "intermediate_size": cfg.mlp_dim,
      "attention_bias": False,
      "mlp_bias": False,
      "pretraining_tp": 1,
  }


def to_treadle(w: np.ndarray, kind: str, cfg) -> np.ndarray:
  """One HF tensor in its [out, in] layout -> the Treadle layout.

  Kinds: 'vector' (norm scales, as is), 'linear' ([out, in] -> [in, out]),
  'heads_in' / 'kv_heads_in' ([h*d, e] -> [e, h, d]), 'heads_out'
  ([e, h*d] -> [h, d, e]), 'heads_bias' / 'kv_heads_bias' ([h*d] -> [h, d]).
  """
  if kind == "vector":
    return w
  if kind == "linear":
    return w.T
  if kind == "heads_in":
    return w.T.reshape(cfg.embed_dim, cfg.num_heads, cfg.head_dim)
  if kind == "kv_heads_in":
    return w.T.reshape(cfg.embed_dim, cfg.num_kv_heads, cfg.head_dim)
  if kind == "heads_out":
    return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.embed_dim)
  if kind == "heads_bias":
    return w.reshape(cfg.num_heads, cfg.head_dim)
  if kind == "kv_heads_bias":
    return w.reshape(cfg.num_kv_heads, cfg.head_dim)
  raise ValueError(kind)


def to_hf(w: np.ndarray, kind: str) -> np.ndarray:
  """One Treadle tensor -> the HF layout (the inverse of `to_treadle`)."""
  if kind == "vector":
    return w
  if kind in ("linear", "heads_in", "kv_heads_in"):
    return w.reshape(w.shape[0], -1).T
  if kind == "heads_out":
    return w.reshape(-1, w.shape[-1]).T
  if kind in ("heads_bias", "kv_heads_bias"):
    return w.reshape(-1)
  raise ValueError(kind)


class TensorReader:
  """Takes HF tensors by name and shape, and reports the ones never taken."""

  def __init__(self, tensors: dict[str, np.ndarray]):
    self.tensors = tensors
    self.used = set()

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor `name`, checked to have `shape`.

    Raises:
      ValueError: naming the tensor if it is missing or has another shape.
    """
    if name not in self.tensors:
      raise ValueError(f"HF checkpoint has no tensor {name!r}.")
    w = np.asarray(self.tensors[name])
    if tuple(w.shape) != tuple(shape):
      raise ValueError(f"HF tensor {name!r} has shape {tuple(w.shape)}, expected {tuple(shape)} "
                       "for this config.")
    self.used.add(name)
    return w

  def block(self, prefix: str, specs: tuple[HfTensor, ...], cfg, block: dict | None = None):
    """Reads `specs` under HF `prefix` into the nested Treadle `block` (new if None)."""
    block = {} if block is None else block
    for spec in specs:
      set_path(block, spec.path, to_treadle(self.take(prefix + spec.name, spec.shape),
                                            spec.kind, cfg))
    return block

  def embeddings(self, cfg) -> dict:
    """embed, final_norm and (unless tied) lm_head params; a tied model skips lm_head.weight."""
    v, e = cfg.vocab_size, cfg.embed_dim
    params = {"embed": {"embedding": self.take("model.embed_tokens.weight", (v, e))},
              "final_norm": {"scale": self.take("model.norm.weight", (e,))}}
    if cfg.tie_embeddings:
      self.used.add("lm_head.weight")
    else:
      params["lm_head"] = {"kernel": self.take("lm_head.weight", (v, e)).T}
    return params

  def check_all_used(self, model_name: str) -> None:
    """Raises ValueError naming the HF tensors `model_name` has no place for."""
    unused = sorted(n for n in self.tensors
                    if n not in self.used and not n.endswith(_IGNORED_SUFFIXES))
    if unused:
      raise ValueError(f"HF tensors not used by Treadle's {model_name}: {unused[:8]}"
                       f"{' ...' if len(unused) > 8 else ''}")


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  """tree[path[0]][path[1]]... = value, creating the inner dicts."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def as_numpy(params, dtype) -> dict:
  """Contiguous numpy copies of a (boxed or plain, any device) param tree in `dtype`."""
  return jax.tree.map(lambda w: np.ascontiguousarray(jax.device_get(w), dtype=dtype),
                      nn.unbox(params))


def embeddings_to_hf(params: dict, cfg) -> dict[str, np.ndarray]:
  """embed / final_norm / lm_head params -> HF tensors (no lm_head.weight when tied)."""
  out = {"model.embed_tokens.weight": params["embed"]["embedding"],
         "model.norm.weight": params["final_norm"]["scale"]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = params["lm_head"]["kernel"].T
  return out


def block_to_hf(block: dict, prefix: str, specs: tuple[HfTensor, ...]) -> dict[str, np.ndarray]:
  """The HF tensors `specs` of one Treadle block, named under `prefix`."""
  return {prefix + spec.name: to_hf(get_path(block, spec.path), spec.kind) for spec in specs}


def dense_block_tensors(cfg: LlamaConfig) -> tuple[HfTensor, ...]:
  """Every HF tensor of one dense block: attention (with q/k/v biases, q/k norms
  as the config sets), norms (Gemma's four when post_norms) and the gated MLP."""
  specs = list(attention_tensors(cfg, cfg.qkv_bias))
  d, e = cfg.head_dim, cfg.embed_dim
  if cfg.qk_norm:
    specs += [HfTensor(("attn", "query_norm", "scale"), "self_attn.q_norm.weight", "vector", (d,)),
              HfTensor(("attn", "key_norm", "scale"), "self_attn.k_norm.weight", "vector", (d,))]
  if cfg.post_norms:  # HF's post_attention_layernorm is then the attention output's norm.
    specs = [spec._replace(name="pre_feedforward_layernorm.weight")
             if spec.path == ("mlp_norm", "scale") else spec for spec in specs]
    specs += [HfTensor(("post_attn_norm", "scale"), "post_attention_layernorm.weight", "vector",
                       (e,)),
              HfTensor(("post_mlp_norm", "scale"), "post_feedforward_layernorm.weight",
                       "vector", (e,))]
  return tuple(specs) + swiglu_tensors(("mlp",), "mlp.", e, cfg.mlp_dim)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: LlamaConfig,
                   model_name: str = "Llama") -> dict:
  """HF state dict (name -> array) -> plain (unboxed) Treadle params in `param_dtype`.

  The tree matches `nn.unbox(Llama(cfg).init(...)['params'])`: blocks are
  stacked with a leading [L] axis under 'layers' when cfg.scan_layers, else
  stored as layers_0 ... layers_{L-1}. A tied model ignores any lm_head.weight.

  Raises:
    ValueError: naming a tensor that is missing, has the wrong shape, or is
      not used (e.g. a bias this architecture does not have).
  """
  reader = TensorReader(tensors)
  specs = dense_block_tensors(cfg)
  blocks = [reader.block(f"model.layers.{i}.", specs, cfg) for i in range(cfg.num_layers)]
  params = reader.embeddings(cfg)
  if cfg.scan_layers:
    params["layers"] = jax.tree.map(lambda *ws: np.stack(ws), *blocks)
  else:
    params.update({f"layers_{i}": block for i, block in enumerate(blocks)})
  reader.check_all_used(model_name)
  return as_numpy(params, np.dtype(jax.numpy.dtype(cfg.param_dtype)))


def hf_from_params(params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
  """Treadle params (boxed or plain, any device) -> HF state dict of float32 arrays.

  A tied model gets no lm_head.weight (HF ties it to model.embed_tokens.weight).
  Tensor names follow `dense_block_tensors` (the format's config.json decides
  whether they make sense: see `hf_config_from_model` and hf_zoo).
  """
  params = as_numpy(params, np.float32)
  out = embeddings_to_hf(params, cfg)
  specs = dense_block_tensors(cfg)
  for i in range(cfg.num_layers):
    if cfg.scan_layers:
      block = jax.tree.map(lambda w, i=i: w[i], params["layers"])
    else:
      block = params[f"layers_{i}"]
    out.update(block_to_hf(block, f"model.layers.{i}.", specs))
  return {name: np.ascontiguousarray(w) for name, w in out.items()}


def read_checkpoint(hf_dir: str) -> tuple[LlamaConfig, dict]:
  """A transformers `LlamaForCausalLM` directory -> (model config, plain params)."""
  hf_config, tensors = hf_io.read_hf_dir(hf_dir)
  cfg = LlamaConfig.from_dict(model_config_from_hf(hf_config))
  return cfg, params_from_hf(tensors, cfg)


def write_checkpoint(hf_dir: str, cfg: LlamaConfig, variables: dict) -> list[str]:
  """Writes config.json and float32 safetensors that `LlamaForCausalLM` loads."""
  hf_config = hf_config_from_model(cfg)  # Checks first: nothing written if unexportable.
  return hf_io.write_hf_dir(hf_dir, hf_config, hf_from_params(variables["params"], cfg))


LLAMA = Converter("a transformers LlamaForCausalLM save_pretrained directory",
                  read_checkpoint, write_checkpoint)
