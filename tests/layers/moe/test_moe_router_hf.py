"""Parity of our routers, balance loss and MoE layer with transformers' Mixtral, Qwen2-MoE, DeepSeek-V3.

Every parameter (and DeepSeek's e_score_correction_bias) is random, never the
default initialisation, so a mixed-up axis or an ignored bias shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.moe import MoeFeedForward, route

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import configuration_deepseek_v3, modeling_deepseek_v3  # pylint: disable=g-import-not-at-top
from transformers.models.mixtral import configuration_mixtral, modeling_mixtral  # pylint: disable=g-import-not-at-top
from transformers.models.qwen2_moe import configuration_qwen2_moe, modeling_qwen2_moe  # pylint: disable=g-import-not-at-top

jax.config.update("jax_default_matmul_precision", "highest")
E, K, HIDDEN, MLP, N = 8, 2, 16, 12, 24


def _rand(rng, *shape, scale=1.0):
  return (rng.standard_normal(shape) * scale).astype(np.float32)


def _deepseek_config(**kw):
  fields = dict(hidden_size=HIDDEN, n_routed_experts=E, num_experts_per_tok=K, n_group=4,
                topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                moe_intermediate_size=MLP, n_shared_experts=1, intermediate_size=32,
                hidden_act="silu") | kw
  return configuration_deepseek_v3.DeepseekV3Config(**fields)


def _as_sets(indices):
  return [set(row) for row in np.asarray(indices).tolist()]


def _check_same_routing(ours, idx_hf, w_hf):
  """Same chosen experts per token (as sets) and the same weight for each."""
  assert _as_sets(ours.indices) == _as_sets(idx_hf)
  ours_w = {(i, int(e)): float(w) for i, (row_e, row_w) in
            enumerate(zip(np.asarray(ours.indices), np.asarray(ours.weights))) for e, w in zip(row_e, row_w)}
  hf_w = {(i, int(e)): float(w) for i, (row_e, row_w) in
          enumerate(zip(np.asarray(idx_hf), np.asarray(w_hf))) for e, w in zip(row_e, row_w)}
  assert ours_w.keys() == hf_w.keys()
  np.testing.assert_allclose([ours_w[key] for key in hf_w], list(hf_w.values()), rtol=1e-5, atol=1e-6)


def test_sigmoid_router_matches_deepseek_v3():
  rng = np.random.default_rng(0)
  router = modeling_deepseek_v3.DeepseekV3TopkRouter(_deepseek_config())
  weight, bias, x = _rand(rng, E, HIDDEN), _rand(rng, E, scale=0.3), _rand(rng, N, HIDDEN)
  with torch.no_grad():
    router.weight.copy_(torch.from_numpy(weight))
    router.e_score_correction_bias.copy_(torch.from_numpy(bias))
    logits_hf, w_hf, idx_hf = router(torch.from_numpy(x))
  logits = jnp.asarray(x) @ jnp.asarray(weight).T
  np.testing.assert_allclose(logits, logits_hf.numpy(), rtol=1e-5, atol=1e-5)
  ours = route(logits, jnp.asarray(bias), kind="sigmoid", k=K, norm_topk=True, num_groups=4,
               topk_groups=2, routed_scaling_factor=2.5)
  _check_same_routing(ours, idx_hf.numpy(), w_hf.numpy())
  # The bias matters here: without it the choice differs for some token.
  plain = route(logits, None, kind="sigmoid", k=K, norm_topk=True, num_groups=4, topk_groups=2,
                routed_scaling_factor=2.5)
  assert _as_sets(plain.indices) != _as_sets(idx_hf.numpy())


def test_softmax_router_matches_mixtral_and_qwen2_moe():
  rng = np.random.default_rng(1)
  x = _rand(rng, N, HIDDEN)
  weight = _rand(rng, E, HIDDEN)
  mixtral = modeling_mixtral.MixtralTopKRouter(configuration_mixtral.MixtralConfig(
      hidden_size=HIDDEN, num_local_experts=E, num_experts_per_tok=K))
  qwen = modeling_qwen2_moe.Qwen2MoeTopKRouter(configuration_qwen2_moe.Qwen2MoeConfig(
      hidden_size=HIDDEN, num_experts=E, num_experts_per_tok=K, norm_topk_prob=False))
  logits = jnp.asarray(x) @ jnp.asarray(weight).T
  for hf, norm in ((mixtral, True), (qwen, False)):
    with torch.no_grad():
      hf.weight.copy_(torch.from_numpy(weight))
      _, w_hf, idx_hf = hf(torch.from_numpy(x))
    ours = route(logits, None, kind="softmax", k=K, norm_topk=norm)
    _check_same_routing(ours, idx_hf.numpy(), w_hf.numpy())


def test_load_balance_loss_is_mixtral_loss_over_k():
  rng = np.random.default_rng(2)
  b, t = 3, 8
  logits = _rand(rng, b, t, E, scale=2.0)
  mask = np.ones((b, t), bool)
  mask[1, 5:] = False
  mask[2, :2] = False
  hf = modeling_mixtral.load_balancing_loss_func((torch.from_numpy(logits.reshape(b * t, E)),),
                                                 num_experts=E, top_k=K,
                                                 attention_mask=torch.from_numpy(mask.astype(np.int64)))
  from layers.moe import moe_stats  # pylint: disable=g-import-not-at-top
  r = route(jnp.asarray(logits.reshape(b * t, E)), None, kind="softmax", k=K, norm_topk=True)
  r = type(r)(*(a.reshape(b, t, -1) for a in r))
  ours = moe_stats(r, jnp.asarray(mask), E)["load_balance_loss"]
  np.testing.assert_allclose(float(ours) * K, float(hf), rtol=1e-5)


def _ours(layer, x, params, bias=None):
  variables = {"params": params, "balance": {"bias": jnp.zeros((E,)) if bias is None else bias}}
  return np.asarray(layer.apply(variables, jnp.asarray(x)))


def _expert_params(gate_up, down):
  """HF fused experts (gate_up_proj [E, 2m, e], down_proj [E, e, m]) -> our experts/{gate,up,down}."""
  m = down.shape[-1]
  return {"gate": jnp.asarray(gate_up[:, :m].transpose(0, 2, 1)),
          "up": jnp.asarray(gate_up[:, m:].transpose(0, 2, 1)),
          "down": jnp.asarray(down.transpose(0, 2, 1))}


def _mlp_params(mlp):
  return {name: {"kernel": jnp.asarray(getattr(mlp, f"{name}_proj").weight.detach().numpy().T)}
          for name in ("gate", "up", "down")}


def _randomise(module, rng):
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.from_numpy(_rand(rng, *p.shape, scale=0.3)))


@pytest.mark.parametrize("impl", ["dropless", "capacity"])
def test_moe_layer_matches_mixtral_block(impl):
  rng = np.random.default_rng(3)
  cfg = configuration_mixtral.MixtralConfig(hidden_size=HIDDEN, intermediate_size=MLP,
                                            num_local_experts=E, num_experts_per_tok=K)
  block = modeling_mixtral.MixtralSparseMoeBlock(cfg).eval()
  _randomise(block, rng)
  x = _rand(rng, 2, N // 2, HIDDEN)
  with torch.no_grad():
    want = block(torch.from_numpy(x)).numpy()
  params = {"router": {"kernel": jnp.asarray(block.gate.weight.detach().numpy().T)},
            "experts": _expert_params(block.experts.gate_up_proj.detach().numpy(),
                                      block.experts.down_proj.detach().numpy())}
  layer = MoeFeedForward(E, K, MLP, impl=impl, capacity_factor=float(E))
  np.testing.assert_allclose(_ours(layer, x, params), want, rtol=1e-4, atol=1e-5)


def test_moe_layer_matches_qwen2_moe_block():
  rng = np.random.default_rng(4)
  cfg = configuration_qwen2_moe.Qwen2MoeConfig(
      hidden_size=HIDDEN, moe_intermediate_size=MLP, shared_expert_intermediate_size=20,
      num_experts=E, num_experts_per_tok=K, norm_topk_prob=False)
  block = modeling_qwen2_moe.Qwen2MoeSparseMoeBlock(cfg).eval()
  _randomise(block, rng)
  x = _rand(rng, 2, N // 2, HIDDEN)
  with torch.no_grad():
    want = block(torch.from_numpy(x)).numpy()
  params = {"router": {"kernel": jnp.asarray(block.gate.weight.detach().numpy().T)},
            "experts": _expert_params(block.experts.gate_up_proj.detach().numpy(),
                                      block.experts.down_proj.detach().numpy()),
            "shared": _mlp_params(block.shared_expert),
            "shared_gate": {"kernel": jnp.asarray(block.shared_expert_gate.weight.detach().numpy().T)}}
  layer = MoeFeedForward(E, K, MLP, shared_expert_mlp_dim=20, shared_expert_gate=True,
                         router_norm_topk=False)
  np.testing.assert_allclose(_ours(layer, x, params), want, rtol=1e-4, atol=1e-5)


def test_moe_layer_matches_deepseek_v3_block():
  rng = np.random.default_rng(5)
  block = modeling_deepseek_v3.DeepseekV3MoE(_deepseek_config(n_shared_experts=2)).eval()
  _randomise(block, rng)
  bias = _rand(rng, E, scale=0.3)
  with torch.no_grad():
    block.gate.e_score_correction_bias.copy_(torch.from_numpy(bias))
  x = _rand(rng, 2, N // 2, HIDDEN)
  with torch.no_grad():
    want = block(torch.from_numpy(x)).numpy()
  params = {"router": {"kernel": jnp.asarray(block.gate.weight.detach().numpy().T)},
            "experts": _expert_params(block.experts.gate_up_proj.detach().numpy(),
                                      block.experts.down_proj.detach().numpy()),
            "shared": _mlp_params(block.shared_experts)}
  layer = MoeFeedForward(E, K, MLP, shared_expert_mlp_dim=2 * MLP, router="sigmoid",
                         router_num_groups=4, router_topk_groups=2, routed_scaling_factor=2.5)
  np.testing.assert_allclose(_ours(layer, x, params, jnp.asarray(bias)), want, rtol=1e-4, atol=1e-5)
