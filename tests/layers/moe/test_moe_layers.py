"""Tests for the MoE layers: router, dispatch (dropless, capacity), the module, expert parallelism."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from configs.base import DEFAULT_LOGICAL_AXIS_RULES
from train.sharding import MESH_AXES
from helpers.moe_reference import dense_reference
from layers.moe import STAT_NAMES, MoeFeedForward, Router, RouterOutput, moe_stats, route
from layers.moe import dispatch as md

jax.config.update("jax_default_matmul_precision", "highest")


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _experts(seed, num_experts, e, m):
  return (_normal(seed, (num_experts, e, m), e ** -0.5), _normal(seed + 1, (num_experts, e, m), e ** -0.5),
          _normal(seed + 2, (num_experts, m, e), m ** -0.5))


def _routing(seed, n, num_experts, k):
  """Random distinct experts per token and random positive weights."""
  rng = np.random.default_rng(seed)
  indices = np.stack([rng.permutation(num_experts)[:k] for _ in range(n)]).astype(np.int32)
  return jnp.asarray(rng.uniform(0.1, 1.0, (n, k)), jnp.float32), jnp.asarray(indices)


def _unbox(tree):
  return jax.tree.map(lambda p: p.value if isinstance(p, nn.Partitioned) else p, tree,
                      is_leaf=lambda p: isinstance(p, nn.Partitioned))


# --- dispatch ---------------------------------------------------------------------------------

def test_dropless_matches_dense_reference_forward_and_grads():
  n, e, m, num_experts, k = 12, 8, 6, 5, 2
  x = _normal(0, (n, e))
  weights, indices = _routing(1, n, num_experts, k)
  params = _experts(2, num_experts, e, m)

  def loss(fn, x, weights, params):
    return jnp.sum(jnp.sin(fn(x, weights, indices, *params)))

  got = jax.jit(md.dropless)(x, weights, indices, *params)
  want = dense_reference(x, weights, indices, *params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  g_got = jax.grad(loss, argnums=(1, 2, 3))(md.dropless, x, weights, params)
  g_want = jax.grad(loss, argnums=(1, 2, 3))(dense_reference, x, weights, params)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # An expert nobody picked gets exactly zero gradient.
  unused = _experts(3, num_experts, e, m)
  g = jax.grad(loss, argnums=3)(md.dropless, x, weights, unused)
  picked = set(np.asarray(indices).ravel())
  for i in set(range(num_experts)) - picked:
    assert all(float(jnp.abs(p[i]).max()) == 0 for p in g)


def test_capacity_with_large_factor_equals_dropless():
  g, s, e, m, num_experts, k = 2, 6, 8, 4, 4, 2
  x = _normal(0, (g, s, e))
  weights, indices = _routing(1, g * s, num_experts, k)
  weights, indices = weights.reshape(g, s, k), indices.reshape(g, s, k)
  params = _experts(2, num_experts, e, m)
  got, dropped = md.capacity_dispatch(x, weights, indices, *params, capacity_factor=float(num_experts))
  want = md.dropless(x.reshape(g * s, e), weights.reshape(-1, k), indices.reshape(-1, k), *params)
  np.testing.assert_allclose(got.reshape(g * s, e), want, rtol=1e-5, atol=1e-5)
  assert int(dropped) == 0


def _numpy_capacity_keep(indices, mask, num_experts, cap):
  """Choice-major queue per group: the reference for which assignments fit."""
  g, s, k = indices.shape
  keep = np.zeros((g, s, k), bool)
  for gi in range(g):
    used = np.zeros(num_experts, int)
    for ki in range(k):
      for si in range(s):
        if not mask[gi, si]:
          continue
        ex = indices[gi, si, ki]
        if used[ex] < cap:
          keep[gi, si, ki] = True
        used[ex] += 1
  return keep


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_capacity_small_factor_drops_and_counts(factor):
  g, s, e, m, num_experts, k = 2, 8, 8, 4, 4, 2
  x = _normal(0, (g, s, e))
  rng = np.random.default_rng(5)
  # Skewed routing: expert 0 is everyone's first choice, so it overflows.
  first = np.zeros((g, s), np.int32)
  second = rng.integers(1, num_experts, (g, s)).astype(np.int32)
  indices = np.stack([first, second], -1)
  weights = jnp.asarray(rng.uniform(0.1, 1, (g, s, k)), jnp.float32)
  mask = np.ones((g, s), bool)
  mask[1, -3:] = False  # Padding takes no slot and is never counted as dropped.
  params = _experts(2, num_experts, e, m)
  cap = md.capacity(s, k, num_experts, factor)
  assert cap == int(np.ceil(factor * s * k / num_experts))
  got, dropped = md.capacity_dispatch(x, weights, jnp.asarray(indices), *params,
                                      capacity_factor=factor, token_mask=jnp.asarray(mask))
  keep = _numpy_capacity_keep(indices, mask, num_experts, cap)
  real = mask[:, :, None] & np.ones(k, bool)
  assert int(dropped) == int((real & ~keep).sum()) > 0
  kept_weights = jnp.where(jnp.asarray(keep), weights, 0.0)
  want = dense_reference(x.reshape(g * s, e), kept_weights.reshape(-1, k),
                         jnp.asarray(indices).reshape(-1, k), *params).reshape(g, s, e)
  np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], rtol=1e-5, atol=1e-5)


def test_capacity_is_at_least_one_and_rejects_nonpositive_factor():
  assert md.capacity(1, 1, 64, 0.01) == 1
  with pytest.raises(ValueError, match="model.moe.capacity_factor"):
    md.capacity(8, 2, 4, 0.0)


# --- router -----------------------------------------------------------------------------------

def test_softmax_router_matches_formula_and_bias_only_selects():
  logits = _normal(0, (6, 5))
  probs = np.asarray(jax.nn.softmax(logits))
  for norm in (True, False):
    out = route(logits, None, kind="softmax", k=2, norm_topk=norm)
    want_idx = np.argsort(-probs, axis=-1)[:, :2]
    np.testing.assert_array_equal(out.indices, want_idx)
    want_w = np.take_along_axis(probs, want_idx, -1)
    if norm:
      want_w = want_w / want_w.sum(-1, keepdims=True)
    np.testing.assert_allclose(out.weights, want_w, rtol=1e-6)
    np.testing.assert_allclose(out.probs, probs, rtol=1e-6)
  # A large bias on expert 4 makes everyone pick it, at its *unbiased* probability.
  bias = jnp.array([0, 0, 0, 0, 10.0])
  out = route(logits, bias, kind="softmax", k=2, norm_topk=False)
  assert (np.asarray(out.indices)[:, 0] == 4).all()
  np.testing.assert_allclose(out.weights[:, 0], probs[:, 4], rtol=1e-6)
  g = jax.grad(lambda b: route(logits, b, kind="softmax", k=2, norm_topk=True).weights.sum())(bias)
  assert float(jnp.abs(g).max()) == 0


def test_sigmoid_router_groups_and_scaling():
  n, num_experts = 16, 8
  logits = _normal(0, (n, num_experts), 2.0)
  bias = _normal(1, (num_experts,), 0.3)
  out = route(logits, bias, kind="sigmoid", k=2, norm_topk=True, num_groups=4, topk_groups=2,
              routed_scaling_factor=2.5)
  scores = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  choice = scores + np.asarray(bias)
  for i in range(n):
    groups = choice[i].reshape(4, 2).sum(-1)  # top-2 of a group of two = its sum
    kept = np.argsort(-groups)[:2]
    allowed = np.concatenate([np.arange(2 * j, 2 * j + 2) for j in kept])
    best = allowed[np.argsort(-choice[i, allowed])[:2]]
    assert set(np.asarray(out.indices[i])) == set(best)
    w = scores[i, np.asarray(out.indices[i])]
    np.testing.assert_allclose(out.weights[i], 2.5 * w / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(out.probs, scores / scores.sum(-1, keepdims=True), rtol=1e-5)


def test_router_module_params_and_float32_logits():
  x = _normal(0, (4, 8)).astype(jnp.bfloat16)
  router = Router(6, 2, kind="sigmoid", num_groups=3, topk_groups=2, dtype=jnp.bfloat16)
  params = router.init(jax.random.key(0), x)["params"]
  assert params["kernel"].names == ("embed", None)
  assert params["kernel"].value.shape == (8, 6)
  out = router.apply({"params": params}, x)
  assert out.logits.dtype == out.weights.dtype == jnp.float32
  assert out.indices.dtype == jnp.int32 and out.indices.shape == (4, 2)
  np.testing.assert_allclose(out.logits, x.astype(jnp.float32) @ params["kernel"].value,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts_per_token=5), "model.moe.num_experts_per_token"),
    (dict(router_num_groups=3), "model.moe.router_num_groups"),
    (dict(router_num_groups=2, router_topk_groups=3), "model.moe.router_topk_groups"),
    (dict(impl="capacity", capacity_factor=0.0), "model.moe.capacity_factor"),
    (dict(impl="capacity", capacity_factor=-1.0), "model.moe.capacity_factor"),
    (dict(router="relu"), "model.moe.router"),
    (dict(impl="sparse"), "model.moe.impl"),
    (dict(shared_expert_gate=True), "model.moe.shared_expert_gate"),
    (dict(num_experts=0, num_experts_per_token=0), "model.moe.num_experts"),
])
def test_bad_config_names_the_field(kwargs, field):
  fields = dict(num_experts=4, num_experts_per_token=2, expert_mlp_dim=4) | kwargs
  with pytest.raises(ValueError, match=field):
    MoeFeedForward(**fields).init(jax.random.key(0), jnp.ones((1, 2, 8)))


# --- module -----------------------------------------------------------------------------------

def _module(**kw):
  fields = dict(num_experts=4, num_experts_per_token=2, expert_mlp_dim=6) | kw
  return MoeFeedForward(**fields)


def test_module_parameter_tree_and_forward():
  x = _normal(0, (2, 5, 8))
  layer = _module(shared_expert_mlp_dim=10, shared_expert_gate=True)
  variables = layer.init(jax.random.key(0), x)
  p = variables["params"]
  assert p["router"]["kernel"].names == ("embed", None) and p["router"]["kernel"].value.shape == (8, 4)
  for name in ("gate", "up"):
    assert p["experts"][name].names == ("expert", "embed", "mlp")
    assert p["experts"][name].value.shape == (4, 8, 6)
  assert p["experts"]["down"].names == ("expert", "mlp", "embed")
  assert p["experts"]["down"].value.shape == (4, 6, 8)
  assert set(p["shared"]) == {"gate", "up", "down"}
  assert p["shared"]["gate"]["kernel"].value.shape == (8, 10)
  assert p["shared_gate"]["kernel"].names == ("embed", None)
  assert p["shared_gate"]["kernel"].value.shape == (8, 1)
  assert variables["balance"]["bias"].shape == (4,) and float(jnp.abs(variables["balance"]["bias"]).max()) == 0

  bias = _normal(9, (4,))
  y = layer.apply({"params": p, "balance": {"bias": bias}}, x)
  raw = _unbox(p)
  out = route(x.reshape(10, 8) @ raw["router"]["kernel"], bias, kind="softmax", k=2, norm_topk=True)
  e = raw["experts"]
  want = dense_reference(x.reshape(10, 8), out.weights, out.indices, e["gate"], e["up"], e["down"])
  s = raw["shared"]
  shared = (jax.nn.silu(x @ s["gate"]["kernel"]) * (x @ s["up"]["kernel"])) @ s["down"]["kernel"]
  want = want.reshape(2, 5, 8) + jax.nn.sigmoid(x @ raw["shared_gate"]["kernel"]) * shared
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  y16 = _module(dtype=jnp.bfloat16).apply(_module().init(jax.random.key(0), x), x)
  assert y16.dtype == jnp.bfloat16


def test_stats_values_and_padding_excluded():
  x = _normal(0, (2, 6, 8))
  mask = np.ones((2, 6), bool)
  mask[0, 4:] = False
  layer = _module(router="sigmoid")
  variables = {k: v for k, v in layer.init(jax.random.key(0), x).items() if k != "moe_stats"}
  _, state = layer.apply(variables, x, jnp.asarray(mask), mutable=["moe_stats"])
  stats = state["moe_stats"]
  assert set(stats) == set(STAT_NAMES)
  assert stats["expert_tokens"].shape == (4,) and float(stats["num_tokens"]) == 10
  assert float(stats["expert_tokens"].sum()) == 20 and float(stats["dropped"]) == 0
  # Padding changes nothing: same stats from only the real tokens of each row.
  x_pad = x.at[0, 4:].set(100.0)
  _, state_pad = layer.apply(variables, x_pad, jnp.asarray(mask), mutable=["moe_stats"])
  for name in STAT_NAMES:
    np.testing.assert_allclose(state_pad["moe_stats"][name], stats[name], rtol=1e-6)
  # Recompute from the router on real tokens, in numpy.
  raw = _unbox(variables["params"])
  logits = np.asarray(x.reshape(12, 8) @ raw["router"]["kernel"])[mask.reshape(-1)]
  out = route(jnp.asarray(logits), None, kind="sigmoid", k=2, norm_topk=True)
  counts = np.bincount(np.asarray(out.indices).ravel(), minlength=4)
  np.testing.assert_allclose(stats["expert_tokens"], counts)
  probs = np.asarray(out.probs)
  np.testing.assert_allclose(stats["load_balance_loss"], 4 * np.sum(counts / 20 * probs.mean(0)),
                             rtol=1e-5)
  rows = [slice(0, 4), slice(4, 10)]
  seq = [np.sum(np.bincount(np.asarray(out.indices[r]).ravel(), minlength=4) * 4 / (2 * len(probs[r]))
                * probs[r].mean(0)) for r in rows]
  np.testing.assert_allclose(stats["seq_balance_loss"], np.mean(seq), rtol=1e-5)
  z = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(stats["router_z_loss"], np.mean(z ** 2), rtol=1e-5)


def test_balance_losses_are_one_for_uniform_routing():
  b, t, num_experts, k = 2, 4, 4, 2
  indices = jnp.asarray(np.array([[0, 1], [2, 3], [1, 0], [3, 2]] * 2).reshape(b, t, k), jnp.int32)
  probs = jnp.full((b, t, num_experts), 1 / num_experts)
  r = RouterOutput(jnp.ones((b, t, k)), indices, probs, jnp.zeros((b, t, num_experts)))
  stats = moe_stats(r, jnp.ones((b, t), bool), num_experts)
  assert float(stats["load_balance_loss"]) == pytest.approx(1.0)
  assert float(stats["seq_balance_loss"]) == pytest.approx(1.0)
  assert float(stats["router_z_loss"]) == pytest.approx(np.log(4) ** 2)


def test_capacity_module_reports_dropped():
  x = _normal(0, (2, 8, 8))
  layer = _module(impl="capacity", capacity_factor=0.25)
  variables = {k: v for k, v in layer.init(jax.random.key(0), x).items() if k != "moe_stats"}
  _, state = layer.apply(variables, x, mutable=["moe_stats"])
  # 16 tokens x 2 choices into 4 experts x 1 slot per row: at most 8 of 32 fit.
  assert float(state["moe_stats"]["dropped"]) >= 24


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + _module()(x), None


def test_stats_under_scan_and_unrolled():
  x = _normal(0, (2, 3, 8))
  scanned = nn.scan(_Block, variable_axes={"params": 0, "balance": 0, "moe_stats": 0},
                    split_rngs={"params": True}, length=3,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      return scanned(name="layers")(x, None)[0]
  class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(3):
        x = _Block(name=f"layers_{i}")(x, None)[0]
      return x
  v = Scanned().init(jax.random.key(0), x)
  v = {k: val for k, val in v.items() if k != "moe_stats"}
  _, state = Scanned().apply(v, x, mutable=["moe_stats"])
  stats = state["moe_stats"]["layers"]["MoeFeedForward_0"]
  assert stats["expert_tokens"].shape == (3, 4)
  assert stats["load_balance_loss"].shape == (3,)
  np.testing.assert_allclose(stats["num_tokens"], [6, 6, 6])
  u = Unrolled().init(jax.random.key(0), x)
  u = {k: val for k, val in u.items() if k != "moe_stats"}
  _, state = Unrolled().apply(u, x, mutable=["moe_stats"])
  for i in range(3):
    s = state["moe_stats"][f"layers_{i}"]["MoeFeedForward_0"]
    assert s["expert_tokens"].shape == (4,) and float(s["expert_tokens"].sum()) == 12
  # Applying twice in one call keeps one value, not a tuple.
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      layer = _module()
      return layer(layer(x))
  w = {k: val for k, val in Twice().init(jax.random.key(0), x).items() if k != "moe_stats"}
  _, state = Twice().apply(w, x, mutable=["moe_stats"])
  assert state["moe_stats"]["MoeFeedForward_0"]["num_tokens"].shape == ()


# --- expert parallelism on 8 fake devices -----------------------------------------------------

def _rules(batch_axes):
  return tuple((name, batch_axes) if name == "batch" else (name, axes)
               for name, axes in DEFAULT_LOGICAL_AXIS_RULES)


_EP_RULES = _rules(("data", "fsdp", "expert"))  # Tokens sharded over 'expert' too.
_REPLICATED_RULES = _rules(("data", "fsdp"))  # Tokens replicated over 'expert'.


def _mesh(**sizes):
  shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=jax.devices()[:int(np.prod(shape))])


def _loss_and_grads(layer, variables, x, mask):
  def loss(params, x):
    y, state = layer.apply({"params": params, "balance": variables["balance"]}, x, mask,
                           mutable=["moe_stats"])
    return jnp.sum(jnp.sin(y)), (y, state["moe_stats"])
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, (y, stats)), grads = step(variables["params"], x)
  return y, stats, grads, step.lower(variables["params"], x).as_text()


@pytest.mark.parametrize("impl", ["dropless", "capacity"])
@pytest.mark.parametrize("mesh_sizes, rules", [
    (dict(data=2, expert=4), _EP_RULES),
    (dict(tensor=2, expert=2, fsdp=2), _EP_RULES),
    pytest.param(dict(data=2, expert=2, tensor=2), _REPLICATED_RULES, marks=pytest.mark.slow),
    # No expert parallelism, still per shard.
    pytest.param(dict(data=4, tensor=2), _REPLICATED_RULES, marks=pytest.mark.slow),
], ids=["data2-expert4", "tensor2-expert2-fsdp2", "tokens-replicated-over-expert", "data4-tensor2"])
def test_expert_parallel_matches_one_device(impl, mesh_sizes, rules):
  b, t, e = 8, 4, 8
  layer = _module(num_experts=8, expert_mlp_dim=4, impl=impl, capacity_factor=0.5,
                  shared_expert_mlp_dim=4)
  x = _normal(0, (b, t, e))
  mask = jnp.asarray(np.random.default_rng(1).random((b, t)) > 0.2)
  variables = layer.init(jax.random.key(0), x)
  variables = {"params": variables["params"], "balance": {"bias": _normal(3, (8,), 0.1)}}
  y1, stats1, g1, _ = _loss_and_grads(layer, variables, x, mask)
  if impl == "capacity":
    assert float(stats1["dropped"]) > 0  # The comparison covers drops too.

  mesh = _mesh(**mesh_sizes)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables["params"]), mesh, rules)
    params = jax.device_put(variables["params"], shardings)
    if "expert" in mesh_sizes:
      assert params["experts"]["gate"].value.sharding.spec[0] == "expert"
    y2, stats2, g2, hlo = _loss_and_grads(
        layer, {"params": params, "balance": variables["balance"]}, x, mask)
  # Tokens sharded over 'expert' travel by all-to-all; replicated ones need none.
  assert ("all_to_all" in hlo) == (rules is _EP_RULES)
  np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)
  for name in STAT_NAMES:
    np.testing.assert_allclose(stats2[name], stats1[name], rtol=1e-5, atol=1e-6)
  for a, b_ in zip(jax.tree.leaves(_unbox(g2)), jax.tree.leaves(_unbox(g1))):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)


def test_expert_parallel_rejects_experts_not_divisible_by_shards():
  layer = _module(num_experts=6, expert_mlp_dim=4)
  x = _normal(0, (4, 2, 8))
  variables = layer.init(jax.random.key(0), x)
  with jax.set_mesh(_mesh(data=2, expert=4)), nn.logical_axis_rules(_EP_RULES):
    with pytest.raises(ValueError, match="model.moe.num_experts"):
      jax.jit(lambda v: layer.apply(v, x, mutable=["moe_stats"]))(variables)
