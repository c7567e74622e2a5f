"""benchmarks/wkv7_chunk_accuracy.py reads a workdir of an RWKV-7 model and prints
max |chunked − sequential| float32 logits per chunk size; other families are refused."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import llama_tiny, rwkv_tiny
from helpers import benchmark_script
from models.rwkv import FAMILY as RWKV
from train import checkpoint


def test_prints_each_chunk_size(tmp_path, capsys):
  """A params-only workdir (as `train.convert import` writes) of a small random RWKV-7."""
  config = ml_collections.ConfigDict(rwkv_tiny.get_config().to_dict())
  config.model.update(embed_dim=32, num_layers=2, head_size=8, hidden_dim=64, vocab_size=64)
  model = RWKV.model_class(RWKV.config_class.from_dict(config.model))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  workdir = str(tmp_path)
  checkpoint.save_imported(workdir, nn.unbox(params), config)
  benchmark_script("wkv7_chunk_accuracy").main([f"--workdir={workdir}", "--chunk_sizes=4,16", "--rows=1", "--length=20"])
  lines = capsys.readouterr().out.splitlines()
  errors = {int(m[1]): float(m[2]) for m in (
      re.match(r"chunk_size +(\d+): max \|chunked - sequential\| = (\S+)", line)
      for line in lines) if m}
  assert set(errors) == {4, 16} and all(0 <= e < 1e-4 for e in errors.values()), lines


def test_refuses_another_family(tmp_path):
  """Read from the saved config, before any parameter is loaded."""
  checkpoint.save_imported(str(tmp_path), {"unused": jnp.zeros(1)}, llama_tiny.get_config())
  with pytest.raises(SystemExit, match="holds a 'llama' model"):
    benchmark_script("wkv7_chunk_accuracy").main([f"--workdir={tmp_path}"])
