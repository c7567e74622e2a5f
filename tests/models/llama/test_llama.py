"""Tests for models/llama/: config validation, properties of the forward pass, decoding.

Parameters come from `random_params` (shapes from `jax.eval_shape` of init,
values from numpy) rather than a compiled init: faster, and it perturbs the
norm scales that a real init leaves at one. Most tests share one token shape
[B, T] and always pass positions and segment ids, so jit compiles rarely.
"""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from configs import llama as llama_configs
from configs import llama_tiny
from configs.base import DEFAULT_LOGICAL_AXIS_RULES
from models.llama import Llama, LlamaConfig, init_cache
from train.sharding import MESH_AXES

jax.config.update("jax_default_matmul_precision", "highest")
LOGICAL_NAMES = {name for name, _ in DEFAULT_LOGICAL_AXIS_RULES}
B, T, V = 4, 10, 64


def make_config(**overrides) -> LlamaConfig:
  fields = dict(vocab_size=V, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=48, max_seq_len=32, rope_theta=10_000.0, norm_eps=1e-6,
                tie_embeddings=False, attention_impl="xla", scan_layers=True,
                remat_policy="none", dtype="float32", param_dtype="float32")
  fields.update(overrides)
  return LlamaConfig(**fields)


def abstract_params(cfg: LlamaConfig):
  """Boxed ShapeDtypeStructs of the params (init traced, never compiled)."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), tokens)["params"])


@functools.lru_cache
def random_params(cfg: LlamaConfig, seed: int = 0):
  """Plain params with every entry random; norm scales near 1."""
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(cfg)))
  leaves = []
  for path, leaf in flat:
    if "scale" in jax.tree_util.keystr(path):
      leaves.append(1.0 + 0.2 * rng.standard_normal(leaf.shape))
    else:
      leaves.append(rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2] if leaf.ndim > 1
                                                               else 1))
  return treedef.unflatten([jnp.asarray(x, jnp.float32) for x in leaves])


@functools.lru_cache
def forward_fn(cfg: LlamaConfig):
  model = Llama(cfg)
  return jax.jit(lambda p, tokens, positions, segment_ids: model.apply(
      {"params": p}, tokens, positions=positions, segment_ids=segment_ids))


def random_tokens(seed, shape=(B, T)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


ONES = jnp.ones((B, T), jnp.int32)
ARANGE = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def test_config_from_base_configs():
  cfg = LlamaConfig.from_dict(llama_tiny.get_config().model)
  # The tiny default unrolls its 4 layers (faster on CPU); real sizes scan.
  assert cfg.num_heads == 4 and cfg.dtype == "bfloat16" and not cfg.scan_layers
  for size in llama_configs.SIZES:
    LlamaConfig.from_dict(llama_configs.get_config(f"size={size}").model)
  assert LlamaConfig.from_dict(llama_configs.get_config("size=1b").model).scan_layers


@pytest.mark.parametrize("field,value,pattern", [
    ("num_kv_heads", 3, r"model\.num_heads=4.*model\.num_kv_heads=3"),
    ("attention_impl", "flash", r"model\.attention_impl='flash'.*'xla', 'cudnn', 'pallas'"),
    ("remat_policy", "some", r"model\.remat_policy='some'.*'dots_saveable'"),
    ("dtype", "bfloat17", r"model\.dtype='bfloat17'"),
])
def test_bad_config_names_the_field(field, value, pattern):
  model_cfg = llama_tiny.get_config().model
  with model_cfg.unlocked():
    model_cfg[field] = value
  with pytest.raises(ValueError, match=pattern):
    LlamaConfig.from_dict(model_cfg)


def test_shapes_dtypes_and_logical_axes():
  cfg = make_config(dtype="bfloat16", vocab_size=72)
  boxed = abstract_params(cfg)
  logits = jax.eval_shape(lambda p, t: Llama(cfg).apply({"params": p}, t), boxed,
                          jax.ShapeDtypeStruct((3, 7), jnp.int32))
  assert logits.shape == (3, 7, 72) and logits.dtype == jnp.float32
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert leaf.value.dtype == jnp.float32 and set(leaf.names) <= LOGICAL_NAMES
    assert len(leaf.names) == leaf.value.ndim
  assert boxed["layers"]["attn"]["query"]["kernel"].names == (
      "layers", "embed", "heads", "head_dim")
  assert boxed["layers"]["mlp"]["down"]["kernel"].value.shape == (2, 48, 32)
  assert boxed["lm_head"]["kernel"].names == ("embed", "vocab")
  tied = abstract_params(make_config(tie_embeddings=True, scan_layers=False))
  assert set(tied) == {"embed", "final_norm", "layers_0", "layers_1"}


def test_causality():
  cfg = make_config()
  params, forward = random_params(cfg), forward_fn(cfg)
  tokens = random_tokens(0)
  base = forward(params, tokens, ARANGE, ONES)
  for pos in (0, 4, T - 1):
    changed = forward(params, tokens.at[:, pos].set((tokens[:, pos] + 1) % V), ARANGE, ONES)
    np.testing.assert_array_equal(changed[:, :pos], base[:, :pos])
    assert not np.allclose(changed[:, pos], base[:, pos])


def test_segment_isolation_and_packing():
  cfg = make_config()
  params, forward = random_params(cfg), forward_fn(cfg)
  tokens = random_tokens(1)
  # Row 0 packs segment 1 (4 tokens) and segment 2 (5 tokens) and a pad;
  # row 1 holds segment 2's tokens alone, then padding.
  tokens = tokens.at[1, :5].set(tokens[0, 4:9])
  seg = ONES.at[0].set(jnp.array([1, 1, 1, 1, 2, 2, 2, 2, 2, 0]))
  seg = seg.at[1].set(jnp.array([1] * 5 + [0] * 5))
  pos = ARANGE.at[0].set(jnp.array([0, 1, 2, 3, 0, 1, 2, 3, 4, 0]))
  base = forward(params, tokens, pos, seg)
  changed = forward(params, tokens.at[0, 1].set((tokens[0, 1] + 1) % V), pos, seg)
  np.testing.assert_array_equal(changed[0, 4:9], base[0, 4:9])  # Segment 2 untouched.
  assert not np.allclose(changed[0, 1:4], base[0, 1:4])
  np.testing.assert_allclose(base[0, 4:9], base[1, :5], rtol=1e-5, atol=1e-5)


def _stack_layers(params, num_layers):
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[params[f"layers_{i}"] for i in range(num_layers)])
  rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
  return {**rest, "layers": stacked}


@functools.lru_cache
def loss_and_grad(cfg: LlamaConfig):
  tokens = random_tokens(2)
  def loss(p):
    return jnp.mean(Llama(cfg).apply({"params": p}, tokens) ** 2)
  return jax.jit(jax.value_and_grad(loss))


@pytest.mark.parametrize("scan,remat_policy", [
    (True, "dots_with_no_batch_dims_saveable"), (False, "full")])
def test_scan_and_remat_keep_the_math(scan, remat_policy):
  plain = make_config(scan_layers=False)
  params = random_params(plain, seed=3)
  want, want_grad = loss_and_grad(plain)(params)
  if scan:
    params, want_grad = (_stack_layers(t, plain.num_layers) for t in (params, want_grad))
  cfg = make_config(scan_layers=scan, remat_policy=remat_policy)
  got, got_grad = loss_and_grad(cfg)(params)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               got_grad, want_grad)


@pytest.mark.parametrize("scan", [True, False])
def test_decode_matches_forward_with_left_padding(scan):
  cfg = make_config(scan_layers=scan)
  params, forward, model = random_params(cfg), forward_fn(cfg), Llama(cfg)
  prompt, capacity = 5, 12  # capacity < cfg.max_seq_len on purpose.
  real = random_tokens(4)
  # Even rows: T real tokens. Odd rows: 2 pads then the even row's first T - 2.
  tokens = real.at[1::2, 2:].set(real[0::2, :T - 2])
  seg = ONES.at[1::2, :2].set(0)
  pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
  full = np.asarray(forward(params, tokens, pos, seg))
  np.testing.assert_allclose(full[1::2, 2:], full[0::2, :T - 2], rtol=1e-5, atol=1e-5)

  @jax.jit
  def step(cache, tok, p, s):
    return model.apply({"params": params, "cache": cache}, tok, positions=p, segment_ids=s,
                       decode=True, mutable=["cache"])

  cache = init_cache(cfg, B, capacity)
  logits, cache = step(cache, tokens[:, :prompt], pos[:, :prompt], seg[:, :prompt])
  mask = np.asarray(seg[:, :prompt]) != 0
  np.testing.assert_allclose(np.asarray(logits)[mask], full[:, :prompt][mask], rtol=1e-5,
                             atol=1e-5)
  for i in range(prompt, T):
    logits, cache = step(cache["cache"], tokens[:, i:i + 1], pos[:, i:i + 1], seg[:, i:i + 1])
    np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=1e-5, atol=1e-5)
  index = jax.tree.leaves(nn.unbox(cache["cache"]))[0]  # cache_index sorts first.
  np.testing.assert_array_equal(index, T)


def test_decode_default_positions_and_segments():
  cfg = make_config()
  params, model = random_params(cfg), Llama(cfg)
  tokens = random_tokens(5)
  full = forward_fn(cfg)(params, tokens, ARANGE, ONES)
  cache = nn.unbox(init_cache(cfg, B, T))  # Plain arrays work as well as boxed ones.
  step = jax.jit(lambda c, tok: model.apply({"params": params, "cache": c}, tok, decode=True,
                                            mutable=["cache"]))
  for i in range(4):
    logits, mutated = step(cache, tokens[:, i:i + 1])
    cache = mutated["cache"]
    np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=1e-5, atol=1e-5)


def test_init_cache_layout():
  cfg = make_config(dtype="bfloat16")
  cache = init_cache(cfg, batch_size=3, max_length=10)
  attn = cache["layers"]["attn"]
  assert attn["cached_key"].value.shape == (2, 3, 10, 2, 8)
  assert attn["cached_key"].value.dtype == jnp.bfloat16
  assert attn["cached_segment_ids"].value.shape == (2, 3, 10)
  assert attn["cached_key"].names == ("layers", "batch", "cache_length", "kv_heads", "head_dim")
  assert all(not np.any(x) for x in jax.tree.leaves(nn.unbox(cache)))


def test_sharded_forward_matches_single_device():
  cfg = make_config()
  model, params = Llama(cfg), random_params(cfg)
  tokens = random_tokens(6)
  want = forward_fn(cfg)(params, tokens, ARANGE, ONES)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2, 1, 1), MESH_AXES)
  rules = tuple(DEFAULT_LOGICAL_AXIS_RULES)
  specs = nn.get_partition_spec(abstract_params(cfg))
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  batch = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got = jax.jit(lambda p, t: model.apply({"params": p}, t),
                  in_shardings=(shardings, batch))(params, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _export_for_cuda(cfg, disabled_checks=()):
  params = nn.unbox(abstract_params(dataclasses.replace(cfg, attention_impl="xla")))
  model = Llama(cfg)
  def forward(p, tokens, segment_ids):
    return model.apply({"params": p}, tokens, segment_ids=segment_ids)
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  exported = jax.export.export(jax.jit(forward), platforms=["cuda"],
                               disabled_checks=disabled_checks)(params, tokens, tokens)
  return set(re.findall(r"custom_call @(\S+)\(", exported.mlir_module()))


def test_export_for_cuda_with_xla_attention():
  cfg = make_config(dtype="bfloat16", head_dim=16)
  assert not any("cudnn" in name for name in _export_for_cuda(cfg))


def test_export_for_cuda_with_cudnn_attention(monkeypatch):
  """Lowers attention_impl='cudnn' for CUDA from this host.

  jax checks the installed cuDNN version while tracing and a CPU-only jaxlib has
  none ("cuDNN is not detected"), so on such a host the test stands in for that
  version check; jax's cuDNN rules still validate shapes, dtypes and layouts,
  and the kernel itself is compiled later, on a GPU.
  """
  from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
  if cuda_versions is None:
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not hasattr(fused, "check_cudnn_version"):
      pytest.skip("CPU-only jaxlib and no cuDNN version check to stand in for.")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 90800)
  cfg = make_config(dtype="bfloat16", head_dim=16, attention_impl="cudnn")
  targets = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaScaleBiasSoftmax")
  checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in targets]
  # Segment ids are given, so the segment mask reaches cuDNN as a bias.
  assert _export_for_cuda(cfg, checks) == {"__cudnn$fmhaScaleBiasSoftmax"}
