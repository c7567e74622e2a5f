"""Parity of Treadle's Llama with transformers' LlamaForCausalLM, and checkpoint conversion.

Runs torch on CPU in float32 against eager attention; every HF parameter
(norm weights included) is perturbed away from its default initialisation.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO_ROOT as REPO
from helpers.hf import make_llama
from models import hf_io
from models.llama import Llama, LlamaConfig
from models.llama import hf as llama_hf
from train import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

jax.config.update("jax_default_matmul_precision", "highest")
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 11)).astype(np.int32)
RUN_FIELDS = dict(attention_impl="xla", remat_policy="none", dtype="float32",
                  param_dtype="float32")


def torch_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(TOKENS).long()).logits.numpy()


def treadle_logits(params, cfg: LlamaConfig) -> np.ndarray:
  return np.asarray(jax.jit(lambda p, t: Llama(cfg).apply({"params": p}, t))(params, TOKENS))


@pytest.mark.parametrize("tied,scan", [(False, True), (True, False)])
def test_import_matches_torch(tied, scan, tmp_path):
  model = make_llama(tied, str(tmp_path))
  hf_config, tensors = hf_io.read_hf_dir(str(tmp_path))
  assert ("lm_head.weight" in tensors) == (not tied)
  fields = llama_hf.model_config_from_hf(hf_config)
  assert fields == dict(vocab_size=300, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, mlp_dim=96, max_seq_len=64, rope_theta=50_000.0,
                        norm_eps=1e-5, tie_embeddings=tied)
  cfg = LlamaConfig(**fields, scan_layers=scan, **RUN_FIELDS)
  params = llama_hf.params_from_hf(tensors, cfg)
  abstract = jax.eval_shape(
      lambda: nn.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))))
  assert jax.tree.structure(params) == jax.tree.structure(abstract["params"])
  jax.tree.map(lambda p, a: (p.shape, p.dtype) == (a.shape, a.dtype) or pytest.fail(str(a)),
               params, abstract["params"])
  diff = np.abs(treadle_logits(params, cfg) - torch_logits(model)).max()
  print(f"max |logit diff| = {diff:.2e}")
  assert diff <= 1e-4, diff
  # And back: the HF tensors are reproduced exactly.
  back = llama_hf.hf_from_params(params, cfg)
  assert set(back) == set(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.parametrize("tied,scan", [(True, True), (False, False)])
def test_export_loads_in_transformers(tied, scan, tmp_path):
  cfg = LlamaConfig(vocab_size=300, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, mlp_dim=96, max_seq_len=64, rope_theta=20_000.0,
                    norm_eps=1e-6, tie_embeddings=tied, scan_layers=scan, **RUN_FIELDS)
  abstract = jax.eval_shape(
      lambda: nn.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))))
  rng = np.random.default_rng(1)
  def random_like(path, a):
    offset = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0  # Norm scales near 1.
    return (offset + 0.2 * rng.standard_normal(a.shape)).astype(np.float32)
  params = jax.tree_util.tree_map_with_path(random_like, abstract["params"])
  paths = hf_io.write_hf_dir(str(tmp_path), llama_hf.hf_config_from_model(cfg),
                               llama_hf.hf_from_params(params, cfg))
  assert [os.path.basename(p) for p in paths] == ["config.json", "model.safetensors"]
  model = transformers.LlamaForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager").float().eval()
  assert model.config.rms_norm_eps == 1e-6 and model.config.num_key_value_heads == 2
  assert model.config.rope_parameters["rope_theta"] == 20_000.0
  diff = np.abs(treadle_logits(params, cfg) - torch_logits(model)).max()
  print(f"max |logit diff| = {diff:.2e}")
  assert diff <= 1e-4, diff
  with open(tmp_path / "config.json") as f:
    assert llama_hf.model_config_from_hf(json.load(f))["tie_embeddings"] == tied


def test_sharded_write_and_bfloat16_read(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
             "b": np.ones((4,), ml_dtypes.bfloat16), "c": np.zeros((5,), np.float32)}
  paths = hf_io.write_hf_dir(str(tmp_path), {"model_type": "llama"}, tensors,
                               max_shard_bytes=32)
  assert [os.path.basename(p) for p in paths] == [
      "config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors"]
  _, read = hf_io.read_hf_dir(str(tmp_path))
  assert set(read) == set(tensors)
  for name, value in tensors.items():
    assert read[name].dtype == value.dtype
    np.testing.assert_array_equal(read[name], value)


def test_unsupported_hf_configs_are_refused():
  base = dict(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=16)
  assert llama_hf.model_config_from_hf(base)["head_dim"] == 4
  assert llama_hf.model_config_from_hf(base)["num_kv_heads"] == 2
  with pytest.raises(ValueError, match="longrope"):
    llama_hf.model_config_from_hf({**base, "rope_parameters": {"rope_type": "longrope",
                                                               "rope_theta": 5e5}})
  with pytest.raises(ValueError, match="attention_bias"):
    llama_hf.model_config_from_hf({**base, "attention_bias": True})


def test_params_from_hf_reports_bad_tensors(tmp_path):
  make_llama(False, str(tmp_path))
  hf_config, tensors = hf_io.read_hf_dir(str(tmp_path))
  cfg = LlamaConfig(**llama_hf.model_config_from_hf(hf_config), scan_layers=True, **RUN_FIELDS)
  extra = {**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
  with pytest.raises(ValueError, match="q_proj.bias"):
    llama_hf.params_from_hf(extra, cfg)
  missing = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
  with pytest.raises(ValueError, match="model.norm.weight"):
    llama_hf.params_from_hf(missing, cfg)


def test_cli_round_trip(tmp_path):
  pytest.importorskip("train.checkpoint")
  hf_dir, workdir, out_dir = (str(tmp_path / n) for n in ("hf", "workdir", "out"))
  model = make_llama(False, hf_dir)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  result = subprocess.run(
      [sys.executable, "-m", "train.convert", "import", "--model=llama", hf_dir, workdir],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert workdir in result.stdout
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  config = checkpoint.load_config(workdir)
  assert config.model.num_kv_heads == 2 and config.model.rope_theta == 50_000.0
  assert config.model.family == "llama" and config.model.norm_eps == 1e-5
  # The run computes in bfloat16 (llama_tiny's settings); dtype='float32' checks parity.
  loaded, variables = checkpoint.load_model(workdir, dtype="float32", attention_impl="xla")
  assert config.model.dtype == "bfloat16" and loaded.config.dtype == "float32"
  logits = jax.jit(loaded.apply)(variables, TOKENS)
  np.testing.assert_allclose(logits, torch_logits(model), rtol=0, atol=1e-4)
  paths = convert.export_checkpoint("llama", workdir, out_dir)
  assert os.path.join(out_dir, "model.safetensors") in paths
  reloaded = transformers.LlamaForCausalLM.from_pretrained(
      out_dir, attn_implementation="eager").float().eval()
  np.testing.assert_allclose(torch_logits(reloaded), torch_logits(model), rtol=0, atol=1e-6)


def test_convert_lists_every_format():
  formats = convert.converters()
  assert {name: family for name, (family, _) in formats.items()} == {
      "llama": "llama", "qwen2": "llama", "qwen3": "llama", "mistral": "llama",
      "gemma3": "llama", "mixtral": "moe", "qwen2_moe": "moe", "mamba": "mamba", "mamba2": "mamba",
      "rwkv7": "rwkv", "unet2d": "unet"}
  assert "LlamaForCausalLM" in formats["llama"][1].description
  with pytest.raises(ValueError, match="--model='gpt2' is not a known format"):
    convert.get_converter("gpt2")
