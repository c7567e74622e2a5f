"""Tests for models/rwkv/: config validation, forward-pass properties, packing, decoding.

Parameters come from `random_params` (shapes from `jax.eval_shape` of init, values
from numpy), so lerps, norms, offsets and the low-rank maps are all perturbed.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rwkv as rwkv_configs
from configs import rwkv_tiny
from configs.base import DEFAULT_LOGICAL_AXIS_RULES
from helpers import lm_properties as lm
from helpers.kernels import FAST_COMPILE
from models.rwkv import Rwkv, RwkvConfig, init_cache
from train import sampling

jax.config.update("jax_default_matmul_precision", "highest")
LOGICAL_NAMES = {name for name, _ in DEFAULT_LOGICAL_AXIS_RULES}
B, T, V = 3, 13, 64


def make_config(**overrides) -> RwkvConfig:
  fields = dict(vocab_size=V, embed_dim=32, num_layers=3, head_size=8, hidden_dim=64,
                decay_rank=8, iclr_rank=8, value_rank=4, gate_rank=8, chunk_size=4, max_seq_len=64,
                scan_layers=True, dtype="float32")
  fields.update(overrides)
  return RwkvConfig(**fields)


def abstract_params(cfg: RwkvConfig):
  tokens = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(lambda: Rwkv(cfg).init(jax.random.key(0), tokens)["params"])


@functools.lru_cache
def random_params(cfg: RwkvConfig, seed: int = 0):
  """Plain params, every entry random: scales near 1, lerps in [0, 1], kernels fan-in scaled."""
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(cfg)))
  leaves = []
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    last = name.split("']['")[-1].rstrip("']")
    if "scale" in last:
      leaves.append(1.0 + 0.2 * rng.standard_normal(leaf.shape))
    elif last.startswith("x_"):
      leaves.append(rng.uniform(0.0, 1.0, leaf.shape))
    elif last == "kernel":
      fan_in = leaf.shape[-2] if "output" not in name else leaf.shape[-2] * leaf.shape[-3]
      if "receptance" in name or "'key'" in name and "att" in name or "'value'" in name and (
          "att" in name):
        fan_in = leaf.shape[-3]
      leaves.append(rng.standard_normal(leaf.shape) / np.sqrt(fan_in))
    else:
      leaves.append(0.5 * rng.standard_normal(leaf.shape))
  return treedef.unflatten([jnp.asarray(x, jnp.float32) for x in leaves])


def forward_fn(cfg: RwkvConfig):
  return lm.forward_fn(Rwkv(cfg))


def decode_fn(cfg: RwkvConfig):
  return lm.decode_fn(Rwkv(cfg))


def random_tokens(seed, shape=(B, T)):
  return lm.random_tokens(seed, shape, V)


ONES = jnp.ones((B, T), jnp.int32)


def test_config_from_base_configs():
  cfg = RwkvConfig.from_dict(rwkv_tiny.get_config().model)
  assert cfg.num_heads == 4 and cfg.dtype == "bfloat16" and not cfg.scan_layers
  for size in rwkv_configs.SIZES:
    RwkvConfig.from_dict(rwkv_configs.get_config(f"size={size}").model)
  small = RwkvConfig.from_dict(rwkv_configs.get_config("size=0.1b").model)
  assert (small.num_heads, small.decay_rank, small.value_rank, small.gate_rank) == (12, 64, 32,
                                                                                     128)
  assert 6 * 100e6 < small.train_flops_per_token(4096) < 6 * 200e6


@pytest.mark.parametrize("field,value,pattern", [
    ("head_size", 48, r"model\.embed_dim=128.*model\.head_size=48"),
    ("decay_rank", 0, r"model\.decay_rank=0"),
    ("gate_rank", -1, r"model\.gate_rank=-1"),
    ("remat_policy", "some", r"model\.remat_policy='some'"),
    ("dtype", "bfloat17", r"model\.dtype='bfloat17'"),
    ("rwkv_impl", "triton", r"model\.rwkv_impl='triton'"),
    ("rwkv_impl", "pallas", r"model\.rwkv_impl='pallas'.*model\.chunk_size=0.*'xla'"),
    ("chunk_size", -1, r"model\.chunk_size=-1 must be >= 0"),
])
def test_bad_config_names_the_field(field, value, pattern):
  model_cfg = rwkv_tiny.get_config().model
  with model_cfg.unlocked():
    model_cfg[field] = value
  with pytest.raises(ValueError, match=pattern):
    RwkvConfig.from_dict(model_cfg)


def test_shapes_dtypes_and_logical_axes():
  cfg = make_config(dtype="bfloat16", vocab_size=72)
  boxed = abstract_params(cfg)
  logits = jax.eval_shape(lambda p, t: Rwkv(cfg).apply({"params": p}, t), boxed,
                          jax.ShapeDtypeStruct((3, 7), jnp.int32))
  assert logits.shape == (3, 7, 72) and logits.dtype == jnp.float32
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert leaf.value.dtype == jnp.float32 and set(leaf.names) <= LOGICAL_NAMES
    assert len(leaf.names) == leaf.value.ndim
  att = boxed["layers"]["att"]
  assert att["key"]["kernel"].names == ("layers", "embed", "heads", "head_dim")
  assert att["w1"].names == ("layers", "embed", "low_rank") and att["w1"].value.shape == (2, 32, 8)
  assert "v0" in att and "v0" not in boxed["layers_0"]["att"]
  unrolled = abstract_params(make_config(scan_layers=False))
  assert set(unrolled) == {"embed", "ln0", "layers_0", "layers_1", "layers_2", "ln_out", "head"}
  cache = init_cache(cfg, 2, 100)
  cache_leaves = jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(set(leaf.names) <= LOGICAL_NAMES for leaf in cache_leaves)
  assert nn.unbox(cache)["layers"]["att_state"].shape == (2, 2, 4, 8, 8)


def test_scanned_equals_unrolled():
  cfg = make_config()
  params = random_params(cfg)
  unrolled = dict(params)
  layers = unrolled.pop("layers")
  for i in range(cfg.num_layers - 1):
    unrolled[f"layers_{i + 1}"] = jax.tree.map(lambda w, i=i: w[i], layers)
  tokens = random_tokens(7)
  np.testing.assert_allclose(forward_fn(dataclasses.replace(cfg, scan_layers=False))(
      unrolled, tokens, ONES), forward_fn(cfg)(params, tokens, ONES), atol=1e-5, rtol=1e-5)


def test_chunked_equals_sequential_scan():
  cfg = make_config()
  params, tokens = random_params(cfg), random_tokens(8)
  seg = jnp.asarray(np.repeat([1, 2], (6, 7))[None].repeat(B, 0), jnp.int32)
  np.testing.assert_allclose(forward_fn(cfg)(params, tokens, seg),
                             forward_fn(dataclasses.replace(cfg, chunk_size=0))(params, tokens, seg),
                             atol=2e-5, rtol=2e-5)


def test_pallas_kernel_equals_xla_chunked_form():
  """model.rwkv_impl='pallas' (interpreted on CPU: no model.rwkv_chip) gives the 'xla' logits."""
  cfg = make_config(embed_dim=32, head_size=32, num_layers=1, chunk_size=16, rwkv_impl="xla")
  params, tokens = random_params(cfg), random_tokens(9, (1, T))
  seg = jnp.asarray(np.repeat([1, 2], (6, 7))[None], jnp.int32)
  pallas = forward_fn(dataclasses.replace(cfg, rwkv_impl="pallas")).lower(
      params, tokens, seg).compile(FAST_COMPILE)  # the interpreted kernel: skip XLA's passes
  np.testing.assert_allclose(pallas(params, tokens, seg), forward_fn(cfg)(params, tokens, seg),
                             atol=2e-5, rtol=2e-5)
  assert cfg.on_chip("h100").rwkv_chip == "h100"
  assert cfg.on_chip("h100").on_chip("tpu_v4").rwkv_chip == "h100"


def test_causality():
  """Changing token t changes no logit before t, and does change logits from t on."""
  cfg = make_config()
  params, forward = random_params(cfg), forward_fn(cfg)
  tokens = random_tokens(0)
  base = forward(params, tokens, ONES)
  changed = forward(params, tokens.at[:, 6].set((tokens[:, 6] + 1) % V), ONES)
  np.testing.assert_array_equal(base[:, :6], changed[:, :6])
  assert float(jnp.abs(base[:, 6:] - changed[:, 6:]).min(axis=-1).max()) > 0


def test_packed_documents_equal_separate_ones():
  """A document's logits are the same packed beside others or alone (shift and state reset)."""
  cfg = make_config()
  lm.assert_packed_equals_separate(Rwkv(cfg), random_params(cfg), random_tokens(1), (5, 3, 5))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_prefill_then_decode_equals_full_forward(scan_layers):
  cfg = make_config(scan_layers=scan_layers)
  lm.assert_prefill_then_decode_equals_forward(Rwkv(cfg), random_params(cfg),
                                               init_cache(cfg, B, T), random_tokens(2), 6)


def test_packed_row_prefilled_in_pieces_equals_full_forward():
  """Prefill in several calls, cutting inside and at document boundaries, continues the
  token shifts and the state exactly (and resets them at each new document)."""
  cfg = make_config()
  params = random_params(cfg)
  tokens = random_tokens(6)
  seg = jnp.asarray(np.repeat([1, 2, 3], (4, 6, 3))[None].repeat(B, 0), jnp.int32)
  full = forward_fn(cfg)(params, tokens, seg)
  run = decode_fn(cfg)
  cache, pieces, start = init_cache(cfg, B, T), [], 0
  for length in (5, 1, 4, 3):
    logits, cache = run(params, cache, tokens[:, start:start + length],
                        seg[:, start:start + length])
    pieces.append(logits)
    start += length
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-5, rtol=2e-5)


def test_left_padding_does_not_leak_into_the_state():
  """A left-padded prompt (segment 0 on the padding) decodes as the same prompt unpadded."""
  cfg = make_config()
  params = random_params(cfg)
  prompt, pad = random_tokens(3, (1, 7)), 5
  padded = jnp.concatenate([random_tokens(4, (1, pad)), prompt], axis=1)
  seg = jnp.asarray([[0] * pad + [1] * 7], jnp.int32)
  run = decode_fn(cfg)
  alone, cache_alone = run(params, init_cache(cfg, 1, 20), prompt, jnp.ones((1, 7), jnp.int32))
  with_pad, cache_pad = run(params, init_cache(cfg, 1, 20), padded, seg)
  np.testing.assert_allclose(with_pad[:, pad:], alone, atol=2e-5, rtol=2e-5)
  step = jnp.asarray([[7]], jnp.int32)
  one = jnp.ones((1, 1), jnp.int32)
  np.testing.assert_allclose(run(params, cache_pad, step, one)[0],
                             run(params, cache_alone, step, one)[0], atol=2e-5, rtol=2e-5)


def test_sampler_greedy_matches_full_forward():
  """The shared sampler (prefill in one pass, then one token per step) picks the tokens
  that rerunning the full forward picks, for prompts of different lengths."""
  cfg = make_config()
  params = random_params(cfg)
  model = Rwkv(cfg)
  prompts = [[1, 5, 9, 3, 7], [2, 8]]
  tokens, positions, segments = sampling.left_pad(prompts, pad_id=0)
  generate = jax.jit(functools.partial(sampling.generate_tokens, model, init_cache),
                     static_argnames=("max_new_tokens", "temperature", "top_k", "top_p"))
  new = generate({"params": params}, tokens, positions, segments, jax.random.key(0),
                 max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0)
  for row, prompt in enumerate(prompts):
    seq = jnp.asarray([prompt + list(np.asarray(new[row]))], jnp.int32)
    logits = forward_fn(cfg)(params, seq, jnp.ones_like(seq))
    greedy = np.asarray(jnp.argmax(logits[0], axis=-1))[len(prompt) - 1:-1]
    np.testing.assert_array_equal(greedy, np.asarray(new[row]))


def test_bfloat16_close_to_float32_remat_same_and_gradients_finite():
  cfg = make_config()
  params, tokens = random_params(cfg), random_tokens(5)
  f32 = forward_fn(cfg)(params, tokens, ONES)
  bf16 = forward_fn(dataclasses.replace(cfg, dtype="bfloat16"))(params, tokens, ONES)
  assert np.all(np.isfinite(bf16))
  # On average, not at every position: ln_x is scale-invariant per head, so where a head's
  # WKV output is near zero (e.g. token 0, y = v·(k·r) with k·r ≈ 0) bfloat16 rounding can
  # flip its normalised sign; the reference package behaves the same in fp16/bf16.
  assert float(jnp.abs(bf16 - f32).mean()) < 0.1 * float(jnp.abs(f32).mean())
  remat_cfg = dataclasses.replace(cfg, remat_policy="full")
  np.testing.assert_allclose(forward_fn(remat_cfg)(params, tokens, ONES), f32, atol=1e-5)
  loss = lambda c: lambda p: jnp.mean(jax.nn.logsumexp(  # noqa: E731
      Rwkv(c).apply({"params": p}, tokens, segment_ids=ONES), axis=-1))
  grads = jax.jit(jax.grad(loss(remat_cfg)))(params)
  expected = jax.jit(jax.grad(loss(cfg)))(params)
  for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-4)


def test_weight_decay_skips_per_channel_vectors_and_norms():
  from train import optimizers  # pylint: disable=g-import-not-at-top
  params = nn.unbox(abstract_params(make_config()))
  mask = optimizers._decay_mask(params)  # pylint: disable=protected-access
  flat = {jax.tree_util.keystr(path): wants
          for path, wants in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = {name.split("']['")[-1].rstrip("']") for name, wants in flat.items() if wants}
  assert decayed == {"kernel", "embedding", "w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"}


def test_real_size_gradient_traces_scanned_and_rematerialised():
  """RWKV-7 0.1B's shapes (scanned, remat as configs/rwkv.py sets it) trace through a
  gradient abstractly: bfloat16 compute, float32 params and gradients."""
  cfg = RwkvConfig.from_dict(rwkv_configs.get_config("size=0.1b,seq_len=512").model)
  assert cfg.scan_layers and cfg.remat_policy != "none"
  params = nn.unbox(abstract_params(cfg))
  tokens = jax.ShapeDtypeStruct((2, 512), jnp.int32)

  def loss(p, t):
    logits = Rwkv(cfg).apply({"params": p}, t, segment_ids=jnp.ones_like(t))
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  grads = jax.eval_shape(jax.grad(loss), params, tokens)
  assert grads["layers"]["att"]["key"]["kernel"].shape == (11, 768, 12, 64)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
