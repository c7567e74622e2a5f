"""Tests for models/mamba/: config validation, forward-pass properties, packing, decoding.

Parameters come from `random_params` (shapes from `jax.eval_shape` of init,
values from numpy), so norm scales, D and the conv biases are all perturbed.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mamba as mamba_configs
from configs import mamba_tiny
from configs.base import DEFAULT_LOGICAL_AXIS_RULES
from helpers import lm_properties as lm
from models.mamba import Mamba, MambaConfig, init_cache
from train import sampling

jax.config.update("jax_default_matmul_precision", "highest")
LOGICAL_NAMES = {name for name, _ in DEFAULT_LOGICAL_AXIS_RULES}
B, T, V = 3, 13, 64


def make_config(**overrides) -> MambaConfig:
  fields = dict(vocab_size=V, embed_dim=32, num_layers=2, num_heads=4, head_dim=8,
                state_size=8, num_groups=2, conv_kernel=4, chunk_size=4, max_seq_len=64,
                scan_layers=True, dtype="float32")
  fields.update(overrides)
  return MambaConfig(**fields)


def abstract_params(cfg: MambaConfig):
  tokens = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(lambda: Mamba(cfg).init(jax.random.key(0), tokens)["params"])


@functools.lru_cache
def random_params(cfg: MambaConfig, seed: int = 0):
  """Plain params, every entry random: scales near 1, A_log in log[1, 16], the rest normal."""
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
    elif "kernel" in name and "conv" not in name:
      fan_in = leaf.shape[-2] if "out" not in name else leaf.shape[-2] * leaf.shape[-3]
      leaves.append(rng.standard_normal(leaf.shape) / np.sqrt(fan_in))
    else:
      leaves.append(0.5 * rng.standard_normal(leaf.shape))
  return treedef.unflatten([jnp.asarray(x, jnp.float32) for x in leaves])


def forward_fn(cfg: MambaConfig):
  return lm.forward_fn(Mamba(cfg))


def random_tokens(seed, shape=(B, T)):
  return lm.random_tokens(seed, shape, V)


ONES = jnp.ones((B, T), jnp.int32)


def test_config_from_base_configs():
  cfg = MambaConfig.from_dict(mamba_tiny.get_config().model)
  assert cfg.num_heads == 8 and cfg.dtype == "bfloat16" and not cfg.scan_layers
  for size in mamba_configs.SIZES:
    config = mamba_configs.get_config(f"size={size}")
    MambaConfig.from_dict(config.model)
  big = MambaConfig.from_dict(mamba_configs.get_config("size=130m").model)
  assert big.inner_dim == 2 * big.embed_dim and big.scan_layers
  assert 6 * 100e6 < big.train_flops_per_token(2048) < 6 * 200e6


@pytest.mark.parametrize("field,value,pattern", [
    ("num_groups", 3, r"model\.num_heads=8.*model\.num_groups=3"),
    ("state_size", 0, r"model\.state_size=0"),
    ("time_step_limit", (0.1, 0.01), r"model\.time_step_limit"),
    ("remat_policy", "some", r"model\.remat_policy='some'"),
    ("dtype", "bfloat17", r"model\.dtype='bfloat17'"),
    ("ssm_impl", "fast", r"model\.ssm_impl='fast'"),
    ("ssm_chip", "a100", r"model\.ssm_chip='a100'"),
])
def test_bad_config_names_the_field(field, value, pattern):
  model_cfg = mamba_tiny.get_config().model
  with model_cfg.unlocked():
    model_cfg[field] = value
  with pytest.raises(ValueError, match=pattern):
    MambaConfig.from_dict(model_cfg)


def test_ssm_impl_pallas_names_the_field_for_shapes_the_kernel_cannot_serve():
  model_cfg = mamba_tiny.get_config().model
  with model_cfg.unlocked():
    model_cfg.ssm_impl, model_cfg.ssm_chip, model_cfg.head_dim = "pallas", "h100", 48
  with pytest.raises(ValueError, match=r"model\.ssm_impl='pallas'.*head_dim=48.*'xla'"):
    MambaConfig.from_dict(model_cfg)
  with model_cfg.unlocked():
    model_cfg.ssm_chip = "tpu_v5e"  # The TPU kernel takes any head dim.
  assert MambaConfig.from_dict(model_cfg).ssm_impl == "pallas"


def test_shapes_dtypes_and_logical_axes():
  cfg = make_config(dtype="bfloat16", vocab_size=72)
  boxed = abstract_params(cfg)
  logits = jax.eval_shape(lambda p, t: Mamba(cfg).apply({"params": p}, t), boxed,
                          jax.ShapeDtypeStruct((3, 7), jnp.int32))
  assert logits.shape == (3, 7, 72) and logits.dtype == jnp.float32
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert leaf.value.dtype == jnp.float32 and set(leaf.names) <= LOGICAL_NAMES
    assert len(leaf.names) == leaf.value.ndim
  mixer = boxed["layers"]["mixer"]
  assert mixer["in_x"]["kernel"].names == ("layers", "embed", "heads", "head_dim")
  assert mixer["in_b"]["kernel"].value.shape == (2, 32, 2, 8)
  assert mixer["conv_x"]["kernel"].names == ("layers", "conv_width", "heads", "head_dim")
  tied = abstract_params(make_config(tie_embeddings=True, scan_layers=False))
  assert set(tied) == {"embed", "final_norm", "layers_0", "layers_1"}
  cache = init_cache(cfg, 2, 100)
  cache_leaves = jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(set(leaf.names) <= LOGICAL_NAMES for leaf in cache_leaves)
  assert nn.unbox(cache)["layers"]["mixer"]["ssm_state"].shape == (2, 2, 4, 8, 8)


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
  """A document's logits are the same packed beside others or alone (conv and state reset)."""
  cfg = make_config()
  lm.assert_packed_equals_separate(Mamba(cfg), random_params(cfg), random_tokens(1), (5, 3, 5))


def decode_fn(cfg: MambaConfig):
  return lm.decode_fn(Mamba(cfg))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_prefill_then_decode_equals_full_forward(scan_layers):
  cfg = make_config(scan_layers=scan_layers)
  lm.assert_prefill_then_decode_equals_forward(Mamba(cfg), random_params(cfg),
                                               init_cache(cfg, B, T), random_tokens(2), 6)


def test_pallas_ssd_prefill_then_decode_equals_xla_forward():
  """model.ssm_impl='pallas' (the TPU kernel, interpreted on CPU): a packed prefill through
  the kernel, then one-token steps (xla) from the state it returned, match the xla model."""
  cfg = make_config(chunk_size=8, ssm_impl="pallas")
  params = random_params(make_config(chunk_size=8))
  tokens = random_tokens(5)
  segment_ids = jnp.asarray(np.repeat([[1] * 4 + [2] * 9], B, axis=0), jnp.int32)
  full = forward_fn(make_config(chunk_size=8, ssm_impl="xla"))(params, tokens, segment_ids)
  run = decode_fn(cfg)
  logits, cache = run(params, init_cache(cfg, B, T), tokens[:, :11], segment_ids[:, :11])
  pieces = [logits]
  for i in range(11, T):
    logits, cache = run(params, cache, tokens[:, i:i + 1], segment_ids[:, i:i + 1])
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=5e-5, rtol=5e-5)


def test_packed_row_prefilled_in_pieces_equals_full_forward():
  """Chunked prefill in several calls, cutting inside and at document boundaries, continues
  the conv window and the state exactly (and resets them at each new document)."""
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
  np.testing.assert_allclose(with_pad[:, pad:], forward_fn(cfg)(params, prompt, seg[:, pad:]),
                             atol=2e-5, rtol=2e-5)
  step = jnp.asarray([[7]], jnp.int32)
  one = jnp.ones((1, 1), jnp.int32)
  np.testing.assert_allclose(run(params, cache_pad, step, one)[0],
                             run(params, cache_alone, step, one)[0], atol=2e-5, rtol=2e-5)


def test_sampler_greedy_matches_full_forward():
  """The shared sampler (prefill in one pass, then one token per step) picks the tokens
  that rerunning the full forward picks, for prompts of different lengths."""
  cfg = make_config()
  params = random_params(cfg)
  model = Mamba(cfg)
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


def test_bfloat16_close_to_float32_and_remat_same():
  cfg = make_config()
  params, tokens = random_params(cfg), random_tokens(5)
  f32 = forward_fn(cfg)(params, tokens, ONES)
  bf16 = forward_fn(dataclasses.replace(cfg, dtype="bfloat16"))(params, tokens, ONES)
  assert np.all(np.isfinite(bf16))
  assert float(jnp.abs(bf16 - f32).max()) < 0.1 * float(jnp.abs(f32).max())
  remat = forward_fn(dataclasses.replace(cfg, remat_policy="full"))(params, tokens, ONES)
  np.testing.assert_allclose(remat, f32, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_weight_decay_skips_per_head_vectors_and_norms(scan_layers):
  """A_log, D, dt_bias, conv biases and norm scales never decay, scanned or not."""
  from train import optimizers  # pylint: disable=g-import-not-at-top
  params = nn.unbox(abstract_params(make_config(scan_layers=scan_layers)))
  mask = optimizers._decay_mask(params)  # pylint: disable=protected-access
  flat = {jax.tree_util.keystr(path): wants
          for path, wants in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = {name.split("']['")[-1].rstrip("']") for name, wants in flat.items() if wants}
  assert decayed == {"kernel", "embedding"}
  assert not any(wants for name, wants in flat.items() if "conv" in name and "bias" in name)


def test_real_size_gradient_traces_scanned_and_rematerialised():
  """mamba2-130m's shapes (scanned, remat as configs/mamba.py sets it) trace through a
  gradient abstractly: bfloat16 compute, float32 params and gradients."""
  cfg = MambaConfig.from_dict(mamba_configs.get_config("size=130m,seq_len=512").model)
  assert cfg.scan_layers and cfg.remat_policy == "dots_with_no_batch_dims_saveable"
  params = nn.unbox(abstract_params(cfg))
  tokens = jax.ShapeDtypeStruct((2, 512), jnp.int32)

  def loss(p, t):
    logits = Mamba(cfg).apply({"params": p}, t, segment_ids=jnp.ones_like(t))
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  grads = jax.eval_shape(jax.grad(loss), params, tokens)
  assert grads["layers"]["mixer"]["in_x"]["kernel"].shape == (24, 768, 24, 64)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
