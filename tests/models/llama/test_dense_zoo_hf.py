"""Parity of the dense variants (Llama 3.1 RoPE scaling, Qwen2, Qwen3, Mistral, Gemma 3 text)
with random-weight transformers models, both conversion directions.

Every HF parameter is perturbed; attention is GQA; sequences are longer than
the sliding window and, for RoPE scaling, than the original context. float32
on CPU against eager attention.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.hf import make_hf_decoder
from models import hf_io
from models.llama import Llama, LlamaConfig, hf_zoo
from models.llama import hf as llama_hf
from train import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

jax.config.update("jax_default_matmul_precision", "highest")
SEQ_LEN = 40
TOKENS = np.random.default_rng(0).integers(0, 300, (2, SEQ_LEN)).astype(np.int32)
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
            max_position_embeddings=128)
GEMMA_LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

# name -> (format, transformers class, config fields, expected Treadle fields).
CASES = {
    "llama3_rope": ("llama", "LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 50_000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
        {"rope_scaling": {"kind": "llama3", "original_context": 32}}),
    "linear_rope": ("llama", "LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 10_000.0, "factor": 2.0}),
        {"rope_scaling": {"kind": "linear", "factor": 2.0}}),
    "dynamic_rope": ("llama", "LlamaForCausalLM", dict(
        max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 2.0}),
        {"rope_scaling": {"kind": "dynamic", "original_context": 16}}),
    "yarn_rope": ("llama", "LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16}),
        {"rope_scaling": {"kind": "yarn", "factor": 4.0}}),
    "qwen2_tied": ("qwen2", "Qwen2ForCausalLM", dict(tie_word_embeddings=True),
                   {"qkv_bias": True, "tie_embeddings": True}),
    "qwen2_untied": ("qwen2", "Qwen2ForCausalLM", dict(tie_word_embeddings=False),
                     {"qkv_bias": True, "tie_embeddings": False}),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", dict(tie_word_embeddings=False), {"qk_norm": True}),
    "qwen3_tied": ("qwen3", "Qwen3ForCausalLM", dict(tie_word_embeddings=True),
                   {"qk_norm": True, "tie_embeddings": True}),
    "mistral": ("mistral", "MistralForCausalLM", dict(sliding_window=7),
                {"sliding_window": 7}),
    "gemma3": ("gemma3", "Gemma3ForCausalLM", dict(
        num_hidden_layers=4, layer_types=GEMMA_LAYERS, sliding_window=6,
        query_pre_attn_scalar=24, final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                            "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        {"global_every": 2, "sliding_window": 6, "local_rope_theta": 1e4, "rope_theta": 1e6,
         "query_pre_attn_scalar": 24.0, "final_logit_softcap": 3.0, "scan_layers": False,
         "embed_scale": True, "norm_plus_one": True, "post_norms": True,
         "mlp_activation": "gelu_tanh", "tie_embeddings": True}),
    "gemma3_untied_all_local": ("gemma3", "Gemma3ForCausalLM", dict(
        layer_types=["sliding_attention"] * 2, sliding_window=5, tie_word_embeddings=False),
        {"global_every": 0, "sliding_window": 5, "scan_layers": True, "tie_embeddings": False}),
}
RUN_FIELDS = dict(attention_impl="xla", remat_policy="none", dtype="float32",
                  param_dtype="float32")


def torch_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(TOKENS).long()).logits.numpy()


def treadle_logits(params, cfg: LlamaConfig) -> np.ndarray:
  return np.asarray(jax.jit(lambda p, t: Llama(cfg).apply({"params": p}, t))(params, TOKENS))


def _matches(expected: dict, actual: dict) -> None:
  for key, value in expected.items():
    if isinstance(value, dict):
      _matches(value, actual[key])
    else:
      assert actual[key] == value, (key, actual[key], value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_export_match_transformers(case, tmp_path):
  name, model_class, hf_fields, expected = CASES[case]
  model = make_hf_decoder(model_class, str(tmp_path / "hf"), **{**TINY, **hf_fields})
  family, converter = convert.get_converter(name)
  assert family == "llama"
  cfg, params = converter.read(str(tmp_path / "hf"))
  _matches(expected, cfg.to_dict())
  cfg = LlamaConfig.from_dict({**cfg.to_dict(), **RUN_FIELDS})
  abstract = jax.eval_shape(
      lambda: nn.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))))
  assert jax.tree.structure(params) == jax.tree.structure(abstract["params"])
  want = torch_logits(model)
  diff = np.abs(treadle_logits(params, cfg) - want).max()
  print(f"{case}: max |logit diff| = {diff:.2e}")
  assert diff <= 1e-4, diff

  # Export: the same tensors, and a config.json transformers reads back to the same model.
  converter.write(str(tmp_path / "out"), cfg, {"params": params})
  _, tensors = hf_io.read_hf_dir(str(tmp_path / "hf"))
  _, written = hf_io.read_hf_dir(str(tmp_path / "out"))
  assert set(written) == set(tensors) - {"lm_head.weight"} or set(written) == set(tensors)
  for key, value in written.items():
    np.testing.assert_array_equal(value, tensors[key], err_msg=key)
  reloaded = getattr(transformers, model_class).from_pretrained(
      str(tmp_path / "out"), attn_implementation="eager").float().eval()
  np.testing.assert_allclose(torch_logits(reloaded), want, rtol=0, atol=1e-5)


def test_formats_refuse_what_they_cannot_hold():
  base = LlamaConfig(**RUN_FIELDS)
  with pytest.raises(ValueError, match="model.qk_norm"):
    llama_hf.hf_config_from_model(LlamaConfig(qk_norm=True, **RUN_FIELDS))
  with pytest.raises(ValueError, match="model.sliding_window"):
    hf_zoo.qwen3_hf_config(LlamaConfig(qk_norm=True, sliding_window=8, **RUN_FIELDS))
  with pytest.raises(ValueError, match="model.qkv_bias"):
    hf_zoo.qwen2_hf_config(base)
  with pytest.raises(ValueError, match="model.qk_norm=False"):
    hf_zoo.gemma3_hf_config(base)
  hf = dict(TINY, model_type="llama", intermediate_size=96)
  with pytest.raises(ValueError, match="longrope"):
    llama_hf.model_config_from_hf({**hf, "rope_parameters": {"rope_type": "longrope"}})
  with pytest.raises(ValueError, match="use_sliding_window"):
    hf_zoo.qwen2_fields({**hf, "model_type": "qwen2", "use_sliding_window": True})
  with pytest.raises(ValueError, match="model_type"):
    hf_zoo.mistral_fields(hf)
  with pytest.raises(ValueError, match="layer_types"):
    hf_zoo.gemma3_fields({**hf, "model_type": "gemma3_text", "sliding_window": 4,
                          "hidden_activation": "gelu_pytorch_tanh",
                          "layer_types": ["full_attention", "sliding_attention",
                                          "sliding_attention", "full_attention"]})
  with pytest.raises(ValueError, match="model.scan_layers"):
    LlamaConfig(sliding_window=4, global_every=2, scan_layers=True)
  with pytest.raises(ValueError, match="model.rope_scaling.original_context"):
    LlamaConfig.from_dict({"rope_scaling": {"kind": "llama3", "factor": 8.0}})
