"""The Llama decoder with Native Sparse Attention (`model.attention=nsa`) trains
through the binary's trainer with the Pallas selection kernel (interpret mode),
checkpoints and samples."""

import numpy as np
import pytest

from models import llama
from train import checkpoint, trainer
from helpers.trainer import read_metrics, tiny_config

NSA = {"model.attention": "nsa", "model.nsa.compress_block": 8, "model.nsa.compress_stride": 4,
       "model.nsa.select_block": 8, "model.nsa.select_top_n": 3, "model.nsa.window": 16}


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
