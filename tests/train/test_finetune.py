"""Fine-tuning a model imported from Hugging Face through the normal trainer."""

import jax
import numpy as np
import pytest

from configs import finetune, llama_tiny
from train import checkpoint, convert, sample, trainer

pytest.importorskip("transformers")
from helpers.hf import make_llama  # pylint: disable=g-import-not-at-top


def test_import_then_finetune_then_sample(tmp_path, capsys):
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "run")
  make_llama(tied=False, hf_dir=hf_dir)
  convert.import_checkpoint("llama", hf_dir, workdir, run_config=llama_tiny.get_config())
  imported = checkpoint.load_model(workdir)[1]["params"]

  config = finetune.get_config(f"workdir={workdir}")
  assert config.model.vocab_size == 300 and config.model.rope_theta == 50_000.0
  with pytest.raises(AttributeError):
    config.opt.lrr = 1.0  # Locked like any other config.
  for key, value in {"data.data_dir": str(tmp_path / "tfds"), "data.seq_len": 32,
                     "data.global_batch_size": 8, "train.num_steps": 3, "opt.lr": 1e-4,
                     "opt.warmup_steps": 0, "evals.every_steps": 0,
                     "sample.num_scored": 0, "sample.max_new_tokens": 4}.items():
    section, field = key.split(".")
    config[section][field] = value
  trainer.train_and_evaluate(config, workdir)
  assert "Starting from the imported params at step 0" in capsys.readouterr().out

  tuned = checkpoint.load_model(workdir)[1]["params"]
  assert checkpoint.load_config(workdir).train.num_steps == 3
  # Small steps from the imported weights, not a fresh initialisation.
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       tuned, imported)
  assert 0 < max(jax.tree.leaves(moved)) < 0.01
  assert len(sample.sample(workdir, ["Hi"], max_new_tokens=3)) == 1


def test_finetune_config_needs_a_workdir():
  with pytest.raises(ValueError, match="workdir=DIR"):
    finetune.get_config()
