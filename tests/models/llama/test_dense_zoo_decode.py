"""Decoding the dense variants with the KV cache: sliding-window layers keep a rolling cache of
the window's size, and decode logits equal the full forward's beyond the window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.llama import Llama, LlamaConfig, init_cache
from train import sampling

jax.config.update("jax_default_matmul_precision", "highest")
BASE = dict(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=48, max_seq_len=20, attention_impl="xla", dtype="float32")
VARIANTS = {
    "mistral": dict(sliding_window=4),
    "gemma3": dict(sliding_window=4, global_every=2, scan_layers=False, qk_norm=True,
                   norm_plus_one=True, post_norms=True, mlp_activation="gelu_tanh",
                   embed_scale=True, query_pre_attn_scalar=12.0, local_rope_theta=100.0,
                   final_logit_softcap=5.0, tie_embeddings=True,
                   rope_scaling={"kind": "linear", "factor": 2.0}),
    "qwen3_yarn": dict(qk_norm=True, rope_scaling={"kind": "yarn", "factor": 4.0,
                                                   "original_context": 8}),
}


def _model(name):
  cfg = LlamaConfig.from_dict({**BASE, **VARIANTS[name]})
  model = Llama(cfg)
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
  # Move every parameter off its initial value (norm offsets start at zero).
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [w + 0.1 * jax.random.normal(k, w.shape)
                                     for w, k in zip(leaves, keys)])
  return cfg, model, params


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_decode_matches_the_full_forward(name):
  cfg, model, params = _model(name)
  tokens = jax.random.randint(jax.random.key(3), (2, cfg.max_seq_len), 0, cfg.vocab_size)
  full = jax.jit(model.apply)({"params": params}, tokens)
  cache = init_cache(cfg, 2, cfg.max_seq_len)
  sizes = {jax.tree_util.keystr(path): leaf.value.shape[-3]
           for path, leaf in jax.tree_util.tree_flatten_with_path(
               cache, is_leaf=lambda x: hasattr(x, "value"))[0] if "cached_key" in str(path)}
  for i in range(cfg.num_layers):
    want = 4 if cfg.layer_is_local(i) else cfg.max_seq_len
    got = [size for path, size in sizes.items() if f"layers_{i}" in path or "'layers'" in path]
    assert got == [want], (i, sizes)
  step = jax.jit(lambda cache, t: model.apply({"params": params, "cache": cache}, t,
                                              decode=True, mutable=["cache"]))
  prefill = 6  # Longer than the window.
  logits, state = step(cache, tokens[:, :prefill])
  outs = [logits]
  for i in range(prefill, cfg.max_seq_len):
    logits, state = step(state["cache"], tokens[:, i:i + 1])
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-4)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_greedy_sampling_runs_and_follows_the_logits(name):
  cfg, model, params = _model(name)
  prompts = [[1, 5, 9, 13, 2, 7], [3, 4]]  # Left-padded: the short row starts with padding.
  tokens, positions, segments = sampling.left_pad(prompts, pad_id=0)
  new = jax.jit(lambda *a: sampling.generate_tokens(
      model, init_cache, {"params": params}, *a, max_new_tokens=8, temperature=0.0, top_k=0,
      top_p=1.0))(tokens, positions, segments, jax.random.key(0))
  assert new.shape == (2, 8)
  # Each greedy token is the argmax of a full forward over the (padded) row so far.
  p = tokens.shape[1]
  sequence = jnp.concatenate([tokens, new], axis=1)
  seq_positions = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(8)], axis=1)
  seq_segments = jnp.concatenate([segments, jnp.ones_like(new)], axis=1)
  logits = jax.jit(lambda t, pos, seg: model.apply({"params": params}, t, positions=pos,
                                                   segment_ids=seg))(
      sequence, seq_positions, seq_segments)
  np.testing.assert_array_equal(new, np.argmax(np.asarray(logits)[:, p - 1:-1], axis=-1))
