"""Parity of Treadle's MoE with transformers' Mixtral and Qwen2-MoE, and checkpoint conversion.

Runs torch on CPU in float32 against eager attention; every HF parameter
(norm weights, q/k/v biases, routers, shared-expert gates included) is
perturbed away from its default initialisation.
"""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import moe as moe_configs
from models import hf_io
from models.moe import Moe, MoeConfig
from models.moe import hf as moe_hf
from train import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

jax.config.update("jax_default_matmul_precision", "highest")
VOCAB = 97
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 11)).astype(np.int32)
RUN_FIELDS = dict(attention_impl="xla", remat_policy="none", dtype="float32",
                  param_dtype="float32")
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=64, num_experts_per_tok=2)


def hf_config(model: str, **overrides):
  """A tiny GQA config of HF architecture `model` (head_dim != hidden / heads on purpose)."""
  if model == "mixtral":
    return transformers.MixtralConfig(
        **SHAPE, intermediate_size=24, num_hidden_layers=2, num_local_experts=6,
        rms_norm_eps=1e-5, rope_theta=50_000.0, attn_implementation="eager", **overrides)
  return transformers.Qwen2MoeConfig(
      **SHAPE, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=40,
      num_hidden_layers=3, num_experts=8, mlp_only_layers=[0], norm_topk_prob=False,
      rms_norm_eps=1e-6, rope_theta=20_000.0, attn_implementation="eager", **overrides)


HF_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
# Per HF family: (config.json -> fields, tensors -> params, config -> config.json, params -> tensors).
LAYOUTS = {
    "mixtral": (moe_hf.mixtral_config_from_hf, moe_hf.mixtral_params_from_hf,
                moe_hf.hf_mixtral_config, moe_hf.hf_mixtral_from_params),
    "qwen2_moe": (moe_hf.qwen2_moe_config_from_hf, moe_hf.qwen2_moe_params_from_hf,
                  moe_hf.hf_qwen2_moe_config, moe_hf.hf_qwen2_moe_from_params),
}


def moe_config(fields: dict, **overrides) -> MoeConfig:
  """MoeConfig from `config.model`-style fields (the `moe` section nested as a dict)."""
  return MoeConfig.from_dict({**fields, **RUN_FIELDS, **overrides})


def make_hf_model(model: str, hf_dir: str, **overrides):
  """A random, fully perturbed tiny HF MoE saved to `hf_dir`."""
  torch.manual_seed(0)
  hf_model = getattr(transformers, HF_CLASSES[model])(hf_config(model, **overrides))
  hf_model = hf_model.float().eval()
  with torch.no_grad():
    for param in hf_model.parameters():
      param.add_(0.2 * torch.randn_like(param))
  hf_model.save_pretrained(hf_dir)
  return hf_model


def torch_logits(hf_model) -> np.ndarray:
  with torch.no_grad():
    return hf_model(torch.from_numpy(TOKENS).long()).logits.numpy()


def init_variables(cfg: MoeConfig):
  """Abstract unboxed variables ('params', 'balance') of Moe(cfg)."""
  return jax.eval_shape(
      lambda: nn.unbox(Moe(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))))


def treadle_logits(variables, cfg: MoeConfig) -> np.ndarray:
  return np.asarray(jax.jit(lambda v, t: Moe(cfg).apply(v, t))(variables, TOKENS))


def zero_balance(cfg: MoeConfig):
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), init_variables(cfg)["balance"])


def check_tree_matches(params, abstract):
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  jax.tree.map(lambda p, a: (p.shape, p.dtype) == (a.shape, a.dtype) or pytest.fail(str(a)),
               params, abstract)


@pytest.mark.parametrize("model,scan", [("mixtral", False), ("qwen2_moe", True)])
def test_params_from_hf_match_torch(model, scan, tmp_path):
  hf_model = make_hf_model(model, str(tmp_path))
  hf_cfg, tensors = hf_io.read_hf_dir(str(tmp_path))
  config_from_hf, params_from_hf, _, hf_from_params = LAYOUTS[model]
  fields = config_from_hf(hf_cfg)
  common = dict(vocab_size=VOCAB, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=16,
                max_seq_len=64, tie_embeddings=False)
  common_moe = dict(num_experts_per_token=2, router="softmax", router_num_groups=1,
                    router_topk_groups=1, routed_scaling_factor=1.0, impl="dropless")
  if model == "mixtral":
    want = dict(common, num_layers=2, mlp_dim=24, qkv_bias=False, rope_theta=50_000.0,
                norm_eps=1e-5,
                moe=dict(common_moe, expert_mlp_dim=24, num_experts=6, shared_expert_mlp_dim=0,
                         shared_expert_gate=False, router_norm_topk=True, first_dense_layers=0))
  else:
    want = dict(common, num_layers=3, mlp_dim=48, qkv_bias=True, rope_theta=20_000.0,
                norm_eps=1e-6,
                moe=dict(common_moe, expert_mlp_dim=16, num_experts=8, shared_expert_mlp_dim=40,
                         shared_expert_gate=True, router_norm_topk=False, first_dense_layers=1))
  assert fields == want
  cfg = moe_config(fields, scan_layers=scan)
  params = params_from_hf(tensors, cfg)
  check_tree_matches(params, init_variables(cfg)["params"])
  diff = np.abs(treadle_logits({"params": params, "balance": zero_balance(cfg)}, cfg)
                - torch_logits(hf_model)).max()
  print(f"{model}: max |logit diff| = {diff:.2e}")
  assert diff <= 1e-4, diff
  # And back: exactly the tensors (and names) save_pretrained wrote.
  back = hf_from_params(params, cfg)
  assert set(back) == set(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.parametrize("model", ["mixtral", "qwen2_moe"])
def test_cli_import_then_export(model, tmp_path):
  """import -> load_model (what users run) -> export -> transformers, same logits."""
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  hf_dir, workdir, out_dir = (str(tmp_path / n) for n in ("hf", "workdir", "out"))
  hf_model = make_hf_model(model, hf_dir, tie_word_embeddings=model == "qwen2_moe")
  convert.import_checkpoint(model, hf_dir, workdir,
                            run_config=moe_configs.get_config("size=tiny"))
  config = checkpoint.load_config(workdir)
  assert config.model.family == "moe" and config.model.num_kv_heads == 2
  assert config.model.qkv_bias == (model == "qwen2_moe")
  loaded, variables = checkpoint.load_model(workdir, attention_impl="xla")
  assert not any(np.any(np.asarray(b)) for b in jax.tree.leaves(variables["balance"]))
  cfg = dataclasses.replace(loaded.config, **RUN_FIELDS)  # The tiny config may compute in bf16.
  diff = np.abs(treadle_logits(variables, cfg) - torch_logits(hf_model)).max()
  print(f"{model} via import: max |logit diff| = {diff:.2e}")
  assert diff <= 1e-4, diff
  paths = convert.export_checkpoint(model, workdir, out_dir)
  assert os.path.join(out_dir, "model.safetensors") in paths
  reloaded = getattr(transformers, HF_CLASSES[model]).from_pretrained(
      out_dir, attn_implementation="eager").float().eval()
  np.testing.assert_allclose(torch_logits(reloaded), torch_logits(hf_model), rtol=0, atol=1e-6)
  # A trained DeepSeek-style selection bias has no HF Mixtral / Qwen2-MoE equivalent.
  biased = {**variables, "balance": jax.tree.map(lambda b: b + 0.5, variables["balance"])}
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint, "load_model", lambda *a, **k: (loaded, biased))
    with pytest.raises(ValueError, match="balance"):
      convert.export_checkpoint(model, workdir, str(tmp_path / "biased"))


@pytest.mark.parametrize("model,scan,dense", [("mixtral", True, 0), ("qwen2_moe", False, 1)])
def test_export_loads_in_transformers(model, scan, dense, tmp_path):
  """Random Treadle params (no HF origin) exported, loaded by transformers, same logits."""
  cfg = moe_config(dict(
      vocab_size=VOCAB, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=40, max_seq_len=64, rope_theta=30_000.0, norm_eps=1e-6,
      tie_embeddings=model == "mixtral", scan_layers=scan, qkv_bias=model == "qwen2_moe",
      moe=dict(num_experts=4, num_experts_per_token=2, expert_mlp_dim=24,
               first_dense_layers=dense, shared_expert_mlp_dim=32 if model == "qwen2_moe" else 0,
               shared_expert_gate=model == "qwen2_moe", router_norm_topk=model == "mixtral")))
  abstract = init_variables(cfg)
  rng = np.random.default_rng(1)
  def random_like(path, a):
    offset = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0  # Norm scales near 1.
    return (offset + 0.2 * rng.standard_normal(a.shape)).astype(np.float32)
  params = jax.tree_util.tree_map_with_path(random_like, abstract["params"])
  config_from_hf, _, hf_config_from_model, hf_from_params = LAYOUTS[model]
  hf_io.write_hf_dir(str(tmp_path), hf_config_from_model(cfg), hf_from_params(params, cfg))
  hf_model = getattr(transformers, HF_CLASSES[model]).from_pretrained(
      str(tmp_path), attn_implementation="eager").float().eval()
  assert hf_model.config.rms_norm_eps == 1e-6 and hf_model.config.head_dim == 8
  diff = np.abs(treadle_logits({"params": params, "balance": zero_balance(cfg)}, cfg)
                - torch_logits(hf_model)).max()
  print(f"{model} export: max |logit diff| = {diff:.2e}")
  assert diff <= 1e-4, diff
  with open(tmp_path / "config.json") as f:
    fields = config_from_hf(json.load(f))
  for name, value in fields.pop("moe").items():
    assert getattr(cfg.moe, name) == value, f"moe.{name}"
  for name, value in fields.items():
    if name != "mlp_dim" or model == "qwen2_moe":  # Mixtral has no dense width.
      assert getattr(cfg, name) == value, name


def test_unsupported_hf_configs_are_refused():
  qwen = hf_config("qwen2_moe").to_dict()
  assert moe_hf.qwen2_moe_config_from_hf(qwen)["moe"]["first_dense_layers"] == 1
  for field, value in [("decoder_sparse_step", 2), ("mlp_only_layers", [1]),
                       ("use_sliding_window", True), ("shared_expert_intermediate_size", 0),
                       ("hidden_act", "gelu")]:
    with pytest.raises(ValueError, match=field):
      moe_hf.qwen2_moe_config_from_hf({**qwen, field: value})
  mixtral = hf_config("mixtral").to_dict()
  assert moe_hf.mixtral_config_from_hf(mixtral)["moe"]["num_experts"] == 6
  for field, value in [("sliding_window", 4096), ("router_jitter_noise", 0.1),
                       ("model_type", "qwen2_moe")]:
    with pytest.raises(ValueError, match=field):
      moe_hf.mixtral_config_from_hf({**mixtral, field: value})


def test_inexpressible_configs_are_refused():
  fields = moe_hf.qwen2_moe_config_from_hf(hf_config("qwen2_moe").to_dict())
  qwen = moe_config(fields, scan_layers=False)
  moe_hf.hf_qwen2_moe_config(qwen)  # Representable.
  with pytest.raises(ValueError, match="shared_expert_mlp_dim=40.*first_dense_layers=1"
                                       ".*qkv_bias"):
    moe_hf.hf_mixtral_config(qwen)
  with pytest.raises(ValueError, match="Mixtral cannot express"):  # Import checks it too.
    moe_hf.mixtral_params_from_hf({}, qwen)
  for change, field in [(dict(router="sigmoid"), "model.moe.router="),
                        (dict(routed_scaling_factor=2.5), "routed_scaling_factor"),
                        (dict(router_num_groups=2, router_topk_groups=1), "router_num_groups")]:
    with pytest.raises(ValueError, match=field):
      moe_hf.hf_qwen2_moe_from_params(
          {}, dataclasses.replace(qwen, moe=dataclasses.replace(qwen.moe, **change)))


def test_params_from_hf_reports_bad_tensors(tmp_path):
  make_hf_model("mixtral", str(tmp_path))
  hf_cfg, tensors = hf_io.read_hf_dir(str(tmp_path))
  fields = moe_hf.mixtral_config_from_hf(hf_cfg)
  cfg = moe_config({**fields, "moe": {**fields["moe"], "num_experts": 4}}, scan_layers=True)
  with pytest.raises(ValueError, match=r"gate\.weight' has shape \(6, 32\), expected \(4, 32\)"):
    moe_hf.mixtral_params_from_hf(tensors, cfg)
  cfg = moe_config(fields, scan_layers=True)
  extra = {**tensors, "model.layers.1.block_sparse_moe.experts.6.w1.weight": np.zeros((24, 32))}
  with pytest.raises(ValueError, match=r"not used .*experts\.6\.w1\.weight"):
    moe_hf.mixtral_params_from_hf(extra, cfg)
  missing = {k: v for k, v in tensors.items() if k != "model.layers.1.block_sparse_moe.gate.weight"}
  with pytest.raises(ValueError, match="block_sparse_moe.gate.weight"):
    moe_hf.mixtral_params_from_hf(missing, cfg)
  with pytest.raises(ValueError, match="q_proj.bias"):  # Qwen-style weights in a Mixtral.
    moe_hf.mixtral_params_from_hf(
        {**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}, cfg)
