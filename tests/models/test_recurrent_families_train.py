"""End-to-end for the recurrent families (Mamba-2, RWKV-7, and a Mamba-attention hybrid):
the tiny model trains to a falling loss on 8 fake devices (data x fsdp x tensor),
checkpoints, samples through the shared sampler (recurrent cache, plus the KV cache of a
hybrid's attention block), and reloads."""

import numpy as np
import pytest

from helpers.trainer import read_metrics, tiny_config
from train import checkpoint, sample, trainer
from train.data import tokenizers


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


# configs/mamba_tiny.py:hybrid's layout at tiny_config's sizes: attention at depth 1 of 2.
HYBRID = {"model.attention_layers": (1,), "model.attention.head_dim": 8,
          "model.attention.mlp_dim": 64}


# All slow (-m slow) for the default suite's 15 minutes: there, the model tests check the
# 8-device losses (test_mamba1, test_mamba_hybrid, the RWKV kernel's per-shard run) and the
# colab tests train, checkpoint and sample each family through the trainer on one device.
@pytest.mark.slow
@pytest.mark.parametrize("family,model_fields", [
    pytest.param("mamba", {}, id="mamba"), pytest.param("rwkv", {}, id="rwkv"),
    pytest.param("mamba", HYBRID, id="mamba_hybrid")])
def test_trains_samples_and_reloads(data_dir, tmp_path, family, model_fields):
  workdir = str(tmp_path / "run")
  config = tiny_config(data_dir, family=family, **{
      "train.num_steps": 20, "train.log_every_steps": 5, "opt.lr": 1e-2,
      "checkpoint.every_steps": 20, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
      **model_fields})
  trainer.train_and_evaluate(config, workdir)
  losses = [m["loss"] for _, m in sorted(read_metrics(workdir).items())]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses

  # The shared sampler (recurrent cache, prefill in one pass) equals greedy re-running.
  model, variables = checkpoint.load_model(workdir)
  tok = tokenizers.get_tokenizer("byte")
  tokens = [tok.bos_id] + tok.encode("12+3")
  for _ in range(5):
    logits = model.apply(variables, np.array([tokens], np.int32))
    tokens.append(int(np.argmax(logits[0, -1])))
  assert sample.sample(workdir, ["12+3"], max_new_tokens=5, temperature=0.0) == [
      tok.decode(tokens[-5:])]
