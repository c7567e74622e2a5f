"""The Llama decoder with Native Sparse Attention (`model.attention=nsa`) trains
through the binary's trainer with the Pallas selection kernel (interpret mode),
checkpoints and samples."""

import functools

import jax
import numpy as np
import pytest

from helpers.trainer import read_metrics, tiny_config
from models import llama
from train import checkpoint, sampling, trainer

NSA = {"model.attention": "nsa", "model.nsa.compress_block": 8, "model.nsa.compress_stride": 4,
       "model.nsa.select_block": 8, "model.nsa.select_top_n": 3, "model.nsa.window": 16}


@pytest.mark.slow  # The NSA kernel's numerics and the NSA model's sampling stay in the default suite.
def test_tiny_nsa_model_trains_with_the_kernel_and_samples(tmp_path):
  config = tiny_config(str(tmp_path / "tfds"), **NSA, **{
      "model.attention_impl": "pallas", "train.num_steps": 8, "opt.lr": 1e-2,
      "checkpoint.every_steps": 8, "sample.max_new_tokens": 3})
  final = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  losses = [m["loss"] for _, m in sorted(read_metrics(str(tmp_path / "run")).items())]
  assert losses[-1] < 0.8 * losses[0]
  assert np.isfinite(final["loss"])
  model, variables = checkpoint.load_model(str(tmp_path / "run"))
  assert model.config.attention == "nsa"
  assert "key_slc" in variables["params"]["layers_0"]["attn"]  # NSA's per-branch keys.


@pytest.mark.parametrize("field,value,message", [
    ("attention", "sparse", "model.attention='sparse'"),
    ("attention_impl", "cudnn", "has no cuDNN path"),
])
def test_bad_attention_choices_name_the_field(field, value, message):
  config = tiny_config("/unused", **NSA).model.to_dict()
  config[field] = value
  with pytest.raises(ValueError, match=message):
    llama.LlamaConfig.from_dict(config)


def test_greedy_sampling_with_an_nsa_model():
  """train.sampling.generate_tokens on a 2-layer Llama with NSA blocks (left-padded
  prompts): every new token is the argmax of one full forward over prompt + tokens."""
  cfg = llama.LlamaConfig(
      vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=48, max_seq_len=32, rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=False,
      attention_impl="xla", scan_layers=True, remat_policy="none", dtype="float32",
      param_dtype="float32", attention="nsa",
      nsa=llama.NsaConfig(compress_block=4, compress_stride=2, select_block=4, select_top_n=3,
                          window=6))
  model = llama.Llama(cfg)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 64, 11).tolist(), rng.integers(1, 64, 6).tolist()]
  tokens, positions, ids = sampling.left_pad(prompts, pad_id=0)
  variables = jax.jit(model.init)(jax.random.key(0), tokens)
  new = jax.jit(functools.partial(
      sampling.generate_tokens, model, llama.init_cache, max_new_tokens=12, temperature=0.0,
      top_k=0, top_p=1.0))(variables, tokens, positions, ids, jax.random.key(1))
  new = np.asarray(new)
  p = tokens.shape[1]
  whole = np.concatenate([tokens, new], axis=1)
  ids = np.concatenate([ids, np.ones_like(new)], axis=1)
  positions = np.maximum(np.cumsum(ids, axis=1) - 1, 0)
  logits = jax.jit(model.apply)(variables, whole, positions=positions, segment_ids=ids)
  np.testing.assert_array_equal(np.argmax(logits[:, p - 1:-1], axis=-1), new)
  assert len(set(new.ravel().tolist())) > 3  # not a degenerate constant stream
