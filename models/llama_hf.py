"""Conversion between Hugging Face `LlamaForCausalLM` checkpoints and Treadle Llama params.

Pure numpy: no torch, no transformers. HF stores linear weights as [out, in];
Treadle kernels are [in, out] with heads split out. Both use the rotate-half
RoPE layout, so q/k need no permutation.

Shapes: e embed, v vocab, h heads, k kv heads, d head dim, m mlp, L layers.
"""

import flax.linen as nn
import jax
import numpy as np

from models.llama import LlamaConfig

# (path under a Treadle block, HF name under model.layers.{i}, kind).
_BLOCK_TENSORS = (
    (("attn", "query", "kernel"), "self_attn.q_proj.weight", "heads_in"),
    (("attn", "key", "kernel"), "self_attn.k_proj.weight", "kv_heads_in"),
    (("attn", "value", "kernel"), "self_attn.v_proj.weight", "kv_heads_in"),
    (("attn", "out", "kernel"), "self_attn.o_proj.weight", "heads_out"),
    (("attn_norm", "scale"), "input_layernorm.weight", "vector"),
    (("mlp", "gate", "kernel"), "mlp.gate_proj.weight", "linear"),
    (("mlp", "up", "kernel"), "mlp.up_proj.weight", "linear"),
    (("mlp", "down", "kernel"), "mlp.down_proj.weight", "linear"),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", "vector"),
)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def model_config_from_hf(hf_config: dict) -> dict:
  """`config.model` field values read from an HF Llama config.json dict.

  Returns vocab_size, embed_dim, num_layers, num_heads, num_kv_heads, head_dim,
  mlp_dim, max_seq_len, rope_theta, norm_eps and tie_embeddings.

  Raises:
    ValueError: for features Treadle's Llama does not implement (biases, a
      non-SiLU activation, RoPE scaling such as 'llama3').
  """
  model_type = hf_config.get("model_type", "llama")
  if model_type != "llama":
    raise ValueError(f"HF model_type={model_type!r}; this converter handles 'llama'.")
  if hf_config.get("hidden_act", "silu") != "silu":
    raise ValueError(f"HF hidden_act={hf_config['hidden_act']!r}; only 'silu' is supported.")
  for flag in ("attention_bias", "mlp_bias"):
    if hf_config.get(flag, False):
      raise ValueError(f"HF {flag}=True; Treadle's Llama has no biases.")
  rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"HF RoPE type {rope_type!r} is not supported (only 'default').")
  theta = hf_config.get("rope_theta", rope.get("rope_theta", 10_000.0))
  num_heads = int(hf_config["num_attention_heads"])
  head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads
  return dict(
      vocab_size=int(hf_config["vocab_size"]),
      embed_dim=int(hf_config["hidden_size"]),
      num_layers=int(hf_config["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=int(hf_config.get("num_key_value_heads") or num_heads),
      head_dim=int(head_dim),
      mlp_dim=int(hf_config["intermediate_size"]),
      max_seq_len=int(hf_config.get("max_position_embeddings", 2048)),
      rope_theta=float(theta),
      norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
  )


def hf_config_from_model(cfg: LlamaConfig) -> dict:
  """A config.json dict that transformers' `LlamaForCausalLM` loads (float32 weights)."""
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "initializer_range": 0.02,
      "pretraining_tp": 1,
      "use_cache": True,
      "torch_dtype": "float32",
      "dtype": "float32",
  }


def _to_treadle(w: np.ndarray, kind: str, cfg: LlamaConfig) -> np.ndarray:
  """One HF tensor in its [out, in] layout -> the Treadle kernel layout."""
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
  raise ValueError(kind)


def _to_hf(w: np.ndarray, kind: str) -> np.ndarray:
  """One Treadle kernel -> the HF [out, in] layout."""
  if kind == "vector":
    return w
  if kind in ("linear", "heads_in", "kv_heads_in"):
    return w.reshape(w.shape[0], -1).T
  if kind == "heads_out":
    return w.reshape(-1, w.shape[-1]).T
  raise ValueError(kind)


def _expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name suffix (per block) -> HF shape."""
  e, m = cfg.embed_dim, cfg.mlp_dim
  hd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {
      "self_attn.q_proj.weight": (hd, e), "self_attn.k_proj.weight": (kd, e),
      "self_attn.v_proj.weight": (kd, e), "self_attn.o_proj.weight": (e, hd),
      "input_layernorm.weight": (e,), "post_attention_layernorm.weight": (e,),
      "mlp.gate_proj.weight": (m, e), "mlp.up_proj.weight": (m, e), "mlp.down_proj.weight": (e, m),
  }


def params_from_hf(tensors: dict[str, np.ndarray], cfg: LlamaConfig) -> dict:
  """HF state dict (name -> array) -> plain (unboxed) Treadle params in `param_dtype`.

  The tree matches `nn.unbox(Llama(cfg).init(...)['params'])`: blocks are
  stacked with a leading [L] axis under 'layers' when cfg.scan_layers, else
  stored as layers_0 ... layers_{L-1}. A tied model ignores any lm_head.weight.

  Raises:
    ValueError: naming a tensor that is missing, has the wrong shape, or is
      not used (e.g. a bias this architecture does not have).
  """
  dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  used = set()

  def take(name, shape):
    if name not in tensors:
      raise ValueError(f"HF checkpoint has no tensor {name!r}.")
    w = np.asarray(tensors[name])
    if tuple(w.shape) != tuple(shape):
      raise ValueError(f"HF tensor {name!r} has shape {tuple(w.shape)}, expected {tuple(shape)} "
                       "for this config.")
    used.add(name)
    return w

  shapes = _expected_shapes(cfg)
  blocks = []
  for i in range(cfg.num_layers):
    block = {}
    for path, suffix, kind in _BLOCK_TENSORS:
      w = _to_treadle(take(f"model.layers.{i}.{suffix}", shapes[suffix]), kind, cfg)
      node = block
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = w
    blocks.append(block)

  params = {
      "embed": {"embedding": take("model.embed_tokens.weight", (cfg.vocab_size, cfg.embed_dim))},
      "final_norm": {"scale": take("model.norm.weight", (cfg.embed_dim,))},
  }
  if cfg.scan_layers:
    params["layers"] = jax.tree.map(lambda *ws: np.stack(ws), *blocks)
  else:
    params.update({f"layers_{i}": block for i, block in enumerate(blocks)})
  if cfg.tie_embeddings:
    used.add("lm_head.weight")
  else:
    params["lm_head"] = {"kernel": take("lm_head.weight", (cfg.vocab_size, cfg.embed_dim)).T}

  unused = sorted(n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES))
  if unused:
    raise ValueError(f"HF tensors not used by Treadle's Llama: {unused[:8]}"
                     f"{' ...' if len(unused) > 8 else ''}")
  return jax.tree.map(lambda w: np.ascontiguousarray(w, dtype=dtype), params)


def hf_from_params(params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
  """Treadle params (boxed or plain, any device) -> HF state dict of float32 arrays.

  A tied model gets no lm_head.weight (HF ties it to model.embed_tokens.weight).
  """
  params = jax.tree.map(lambda w: np.asarray(jax.device_get(w), np.float32), nn.unbox(params))
  out = {
      "model.embed_tokens.weight": params["embed"]["embedding"],
      "model.norm.weight": params["final_norm"]["scale"],
  }
  for i in range(cfg.num_layers):
    if cfg.scan_layers:
      block = jax.tree.map(lambda w, i=i: w[i], params["layers"])
    else:
      block = params[f"layers_{i}"]
    for path, suffix, kind in _BLOCK_TENSORS:
      node = block
      for key in path:
        node = node[key]
      out[f"model.layers.{i}.{suffix}"] = _to_hf(node, kind)
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = params["lm_head"]["kernel"].T
  return {name: np.ascontiguousarray(w) for name, w in out.items()}
