"""Tests for Jamba-style hybrids (models/mamba/hybrid.py): Llama decoder blocks at
`model.attention_layers` among the Mamba-2 blocks.

Parameters are random (norm scales, A_log, dt_bias, D and biases perturbed), float32 with
the highest matmul precision, so decoding and packing must match the full forward closely.
Every full forward has the shape [B, T] so the tests share one compilation.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from configs import mamba_tiny
from configs.base import DEFAULT_LOGICAL_AXIS_RULES
from helpers import lm_properties as lm
from models.mamba import Mamba, MambaConfig, hybrid, init_cache
from train import sampling
from train.config_checks import check_sharded_sizes
from train.sharding import MESH_AXES

jax.config.update("jax_default_matmul_precision", "highest")
LOGICAL_NAMES = {name for name, _ in DEFAULT_LOGICAL_AXIS_RULES}
B, T, V = 4, 11, 64
ATTENTION = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "mlp_dim": 48}


def make_config(**overrides) -> MambaConfig:
  fields = dict(vocab_size=V, embed_dim=32, num_layers=3, num_heads=4, head_dim=8,
                state_size=8, num_groups=2, chunk_size=4, max_seq_len=64,
                attention_layers=(1,), scan_layers=True, dtype="float32")
  fields.update(overrides)
  return MambaConfig.from_dict({**fields, "attention": ATTENTION})


def abstract_params(cfg: MambaConfig):
  tokens = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(lambda: Mamba(cfg).init(jax.random.key(0), tokens)["params"])


@functools.lru_cache
def random_params(cfg: MambaConfig, seed: int = 0):
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(cfg)))
  leaves = []
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      leaves.append(1.0 + 0.2 * rng.standard_normal(leaf.shape))
    elif "A_log" in name:
      leaves.append(np.log(rng.uniform(1.0, 16.0, leaf.shape)))
    elif "dt_bias" in name:
      leaves.append(rng.uniform(-4.0, -1.0, leaf.shape))
    elif "kernel" in name:
      leaves.append(0.2 * rng.standard_normal(leaf.shape))
    else:
      leaves.append(0.5 * rng.standard_normal(leaf.shape))
  return treedef.unflatten([jnp.asarray(x, jnp.float32) for x in leaves])


def forward_fn(cfg: MambaConfig):
  return lm.forward_fn(Mamba(cfg))


def decode_fn(cfg: MambaConfig):
  return lm.decode_fn(Mamba(cfg))


def random_tokens(seed, shape=(B, T)):
  return lm.random_tokens(seed, shape, V)


def test_tiny_config_variant():
  cfg = MambaConfig.from_dict(mamba_tiny.get_config("hybrid").model)
  assert cfg.attention_layers == (2,) and cfg.num_mamba_layers == 3
  pure = MambaConfig.from_dict(mamba_tiny.get_config("hybrid=false").model)
  assert pure.attention_layers == () and not pure.on_chip("h100").attention_layers
  assert cfg.matmul_params() != pure.matmul_params()
  assert cfg.train_flops_per_token(128) > cfg.train_flops_per_token(64)
  assert hybrid.mamba_runs(make_config(num_layers=6, attention_layers=(0, 3))) == [(1, 2),
                                                                                   (4, 5)]


@pytest.mark.parametrize("overrides,pattern", [
    ({"attention_layers": (4,)}, r"model\.attention_layers=\(4,\).*0\.\.3.*num_layers=4"),
    ({"attention_layers": (-1,)}, r"model\.attention_layers=\(-1,\) has depth -1"),
    ({"attention_layers": (1, 1)}, r"model\.attention_layers=\(1, 1\) repeats"),
    ({"attention_layers": (3, 1)}, r"model\.attention_layers=\(3, 1\).*write \(1, 3\)"),
    ({"attention_layers": (True,)}, r"model\.attention_layers=\(True,\) must hold int"),
    ({"attention": {"num_heads": 3}}, r"model\.attention\.num_heads=3.*num_kv_heads=2"),
    ({"attention": {"head_dim": 7}}, r"model\.attention\.head_dim=7 must be even"),
    ({"attention": {"mlp_dim": 0}}, r"model\.attention\.mlp_dim=0 must be positive"),
    ({"attention": {"heads": 2}}, r"model\.attention\.heads is not a field"),
    ({"attention_impl": "fast"}, r"model\.attention_impl='fast'"),
])
def test_bad_config_names_the_field(overrides, pattern):
  model_cfg = mamba_tiny.get_config("hybrid").model
  with model_cfg.unlocked():
    for key, value in overrides.items():
      if isinstance(value, dict):
        model_cfg[key].update(value)
      else:
        model_cfg[key] = value
  with pytest.raises(ValueError, match=pattern):
    MambaConfig.from_dict(model_cfg)


def test_mesh_must_divide_the_attention_heads():
  cfg = make_config()
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 1, 4, 1, 1), MESH_AXES)
  with pytest.raises(ValueError, match=r"model\.attention\.num_kv_heads=2.*mesh\.tensor=4"):
    check_sharded_sizes(cfg, mesh, DEFAULT_LOGICAL_AXIS_RULES)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_parameter_and_cache_names_and_logical_axes(scan_layers):
  cfg = make_config(num_layers=5, attention_layers=(1, 2), scan_layers=scan_layers)
  boxed = abstract_params(cfg)
  blocks = {"layers_0_0", "layers_1", "layers_2", "layers_3_4"} if scan_layers else {
      f"layers_{i}" for i in range(5)}
  assert set(boxed) == {"embed", "final_norm", "lm_head"} | blocks
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert set(leaf.names) <= LOGICAL_NAMES and len(leaf.names) == leaf.value.ndim
  attention = boxed["layers_1"]
  assert set(attention) == {"attn_norm", "attn", "mlp_norm", "mlp"}
  assert attention["attn"]["query"]["kernel"].names == ("embed", "heads", "head_dim")
  assert attention["attn"]["key"]["kernel"].value.shape == (32, 2, 8)
  assert attention["mlp"]["up"]["kernel"].names == ("embed", "mlp")
  last = boxed["layers_3_4" if scan_layers else "layers_4"]["mixer"]["in_x"]["kernel"]
  assert last.names == (("layers",) if scan_layers else ()) + ("embed", "heads", "head_dim")
  if scan_layers:
    assert last.value.shape[0] == 2

  cache = init_cache(cfg, 3, 20)
  cache_leaves = jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(set(leaf.names) <= LOGICAL_NAMES for leaf in cache_leaves)
  plain = nn.unbox(cache)
  assert set(plain) == blocks
  assert plain["layers_2"]["attn"]["cached_key"].shape == (3, 20, 2, 8)
  assert cache["layers_2"]["attn"]["cached_key"].names == (
      "batch", "cache_length", "kv_heads", "head_dim")
  state = plain["layers_0_0" if scan_layers else "layers_0"]["mixer"]["ssm_state"]
  assert state.shape == ((1,) if scan_layers else ()) + (3, 4, 8, 8)


def test_document_positions():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 3], [0, 0, 1, 1, 1, 1]], jnp.int32)
  np.testing.assert_array_equal(hybrid.document_positions(seg, seg.shape),
                                [[0, 1, 0, 1, 2, 0], [0, 1, 0, 1, 2, 3]])
  np.testing.assert_array_equal(hybrid.document_positions(None, (1, 3)), [[0, 1, 2]])


def test_packed_documents_equal_separate_ones():
  """A document's logits are the same packed beside others or alone: the attention masks
  other documents and its RoPE positions restart; the Mamba state resets. Row i of the
  'alone' batch starts with document i (what follows it, segment 0, cannot reach it)."""
  cfg = make_config()
  params, forward = random_params(cfg), forward_fn(cfg)
  tokens = random_tokens(1)
  lengths, starts = (4, 2, 5), (0, 4, 6)
  seg = jnp.asarray(np.repeat(np.arange(1, 4), lengths)[None].repeat(B, 0), jnp.int32)
  packed = forward(params, tokens, seg)
  alone_tokens = np.array(random_tokens(7))
  alone_seg = np.zeros((B, T), np.int32)
  for row, (start, length) in enumerate(zip(starts, lengths)):
    alone_tokens[row, :length] = tokens[row, start:start + length]
    alone_seg[row, :length] = 1
  alone = forward(params, jnp.asarray(alone_tokens), jnp.asarray(alone_seg))
  for row, (start, length) in enumerate(zip(starts, lengths)):
    np.testing.assert_allclose(packed[row, start:start + length], alone[row, :length],
                               atol=2e-5, rtol=2e-5)


def test_prefill_then_decode_equals_full_forward():
  """One prefill call fills both caches (KV and recurrent); then one token per call.
  (test_sampler_greedy_matches_full_forward decodes the unscanned layout.)"""
  cfg = make_config()
  params = random_params(cfg)
  tokens = random_tokens(2)
  ones = jnp.ones((B, T), jnp.int32)
  full = forward_fn(cfg)(params, tokens, ones)
  run = decode_fn(cfg)
  logits, cache = run(params, init_cache(cfg, B, T), tokens[:, :5], ones[:, :5])
  pieces = [logits]
  for i in range(5, T):
    logits, cache = run(params, cache, tokens[:, i:i + 1], ones[:, :1])
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-5, rtol=2e-5)
  assert int(nn.unbox(cache)["layers_1"]["attn"]["cache_index"]) == T


def test_sampler_greedy_matches_full_forward():
  """The shared sampler (left-padded prompts with their positions, prefill in one pass,
  then one token per step) picks what rerunning the full forward picks; with Mamba-1
  blocks, unscanned."""
  cfg = make_config(num_layers=4, attention_layers=(0, 3), scan_layers=False, version=1)
  params = random_params(cfg)
  prompts = [[1, 5, 9, 3, 7], [2, 8], [4], [6, 6, 6]]
  tokens, positions, segments = sampling.left_pad(prompts, pad_id=0)
  generate = jax.jit(functools.partial(sampling.generate_tokens, Mamba(cfg), init_cache),
                     static_argnames=("max_new_tokens", "temperature", "top_k", "top_p"))
  new = np.asarray(generate({"params": params}, tokens, positions, segments,
                            jax.random.key(0), max_new_tokens=4, temperature=0.0, top_k=0,
                            top_p=1.0))
  rows, seg = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
  for row, prompt in enumerate(prompts):  # Unpadded, right-filled with segment 0.
    rows[row, :len(prompt) + 4] = prompt + list(new[row])
    seg[row, :len(prompt) + 4] = 1
  logits = forward_fn(cfg)(params, jnp.asarray(rows), jnp.asarray(seg))
  for row, prompt in enumerate(prompts):
    greedy = np.asarray(jnp.argmax(logits[row], axis=-1))[len(prompt) - 1:len(prompt) + 3]
    np.testing.assert_array_equal(greedy, new[row])


def test_sharded_loss_matches_single_device():
  """8 fake devices (data 2 x fsdp 2 x tensor 2): the same next-token loss as one device."""
  cfg = make_config()
  model, params = Mamba(cfg), random_params(cfg)
  tokens = random_tokens(3)
  seg = jnp.asarray(np.repeat([1, 2], (6, T - 6))[None].repeat(B, 0), jnp.int32)

  def loss(logits):
    target = jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits[:, :-1], axis=-1) - target)

  want = loss(forward_fn(cfg)(params, tokens, seg))
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2, 1, 1), MESH_AXES)
  rules = tuple(DEFAULT_LOGICAL_AXIS_RULES)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_params(cfg)), mesh,
                                          rules)
  assert tuple(shardings["layers_1"]["attn"]["query"]["kernel"].spec) == (
      "fsdp", "tensor", None)
  batch = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got = jax.jit(lambda p, t, s: model.apply({"params": p}, t, segment_ids=s),
                  in_shardings=(shardings, batch, batch))(
        jax.device_put(params, shardings), tokens, seg)
  np.testing.assert_allclose(loss(got), want, rtol=1e-5)


def test_hf_export_refuses_a_hybrid():
  from models.mamba import hf, hf_mamba1  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"model\.attention_layers=\(1,\).*Mamba2ForCausalLM"):
    hf.hf_config_from_model(make_config())
  with pytest.raises(ValueError, match=r"model\.attention_layers=\(1,\).*MambaForCausalLM"):
    hf_mamba1.hf_config_from_model(make_config(version=1))
