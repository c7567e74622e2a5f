"""End-to-end: train, evaluate, checkpoint, resume and sample the tiny Llama."""

import os

import jax
import numpy as np
import pytest

from train import checkpoint, sample, trainer
from helpers.trainer import read_metrics, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """One short run shared by the tests that only read its outputs."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(data_dir, **{"train.num_steps": 30, "train.log_every_steps": 5,
                                    "evals.every_steps": 15, "evals.num_batches": 2,
                                    "checkpoint.every_steps": 15, "opt.lr": 1e-2})
  final = trainer.train_and_evaluate(config, workdir)
  return workdir, config, final


def test_loss_falls_and_metrics_are_written(trained):
  workdir, _, final = trained
  train_metrics = read_metrics(workdir)
  assert sorted(train_metrics) == [5, 10, 15, 20, 25, 30]
  assert train_metrics[30]["loss"] < 0.6 * train_metrics[5]["loss"]
  assert {"loss", "accuracy", "grad_norm", "learning_rate", "tokens_per_sec"} <= set(
      train_metrics[30])
  assert sorted(read_metrics(workdir, "eval")) == [15, 30]
  assert final["eval_loss"] == read_metrics(workdir, "eval")[30]["loss"]
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)


def test_checkpoints_kept_and_model_loads(trained):
  workdir, config, _ = trained
  assert sorted(int(n) for n in os.listdir(checkpoint.checkpoint_dir(workdir))) == [15, 30]
  model, variables = checkpoint.load_model(workdir)
  tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
  logits = model.apply(variables, tokens)
  assert logits.shape == (2, 5, config.model.vocab_size)
  assert checkpoint.load_config(workdir).model.to_dict() == config.model.to_dict()


def test_sample_cli_function(trained):
  workdir, _, _ = trained
  greedy = sample.sample(workdir, ["The ", "1+2="], max_new_tokens=6, temperature=0.0)
  assert len(greedy) == 2 and all(isinstance(text, str) for text in greedy)
  assert greedy == sample.sample(workdir, ["The ", "1+2="], max_new_tokens=6, temperature=0.0)
  hot = [sample.sample(workdir, ["The "], max_new_tokens=12, temperature=5.0, seed=s)[0]
         for s in (1, 2, 3)]
  assert len(set(hot)) > 1  # Sampling at high temperature depends on the seed.


def test_prompt_longer_than_model_is_an_error(trained):
  workdir, config, _ = trained
  with pytest.raises(ValueError, match="model.max_seq_len"):
    sample.sample(workdir, ["x" * config.model.max_seq_len], max_new_tokens=4)


def test_sampling_matches_full_forward_greedy(trained):
  """Greedy KV-cache decoding equals re-running the full forward each step."""
  workdir, _, _ = trained
  model, variables = checkpoint.load_model(workdir)
  from train.data import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.get_tokenizer("byte")
  tokens = [tok.bos_id] + tok.encode("12+3")
  for _ in range(6):
    logits = model.apply(variables, np.array([tokens], np.int32))
    tokens.append(int(np.argmax(logits[0, -1])))
  expected = tok.decode(tokens[-6:])
  assert sample.sample(workdir, ["12+3"], max_new_tokens=6, temperature=0.0) == [expected]


_FOUR_STEPS_SHARDED = {"train.num_steps": 4, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


@pytest.fixture(scope="module")
def four_steps(data_dir, tmp_path_factory):
  """4 steps on one device and on a data x fsdp x tensor = 2x2x2 mesh (xla attention): the
  references of the sharding, gradient-accumulation and Pallas comparisons below."""
  one, eight = str(tmp_path_factory.mktemp("one")), str(tmp_path_factory.mktemp("eight"))
  trainer.train_and_evaluate(tiny_config(data_dir, **{"train.num_steps": 4}), one,
                             devices=jax.devices()[:1])
  trainer.train_and_evaluate(
      tiny_config(data_dir, **_FOUR_STEPS_SHARDED, **{"model.attention_impl": "xla"}), eight)
  return one, eight


def _losses(workdir: str) -> list[float]:
  return [m["loss"] for _, m in sorted(read_metrics(workdir).items())]


def test_sharded_mesh_matches_one_device(four_steps):
  one, eight = four_steps
  assert len(_losses(one)) == 4
  np.testing.assert_allclose(_losses(eight), _losses(one), rtol=2e-5)


def test_gradient_accumulation_matches_one_big_batch(data_dir, tmp_path, four_steps):
  one, _ = four_steps
  accum = tiny_config(data_dir, **{"train.num_steps": 4, "opt.grad_accum_steps": 2})
  trainer.train_and_evaluate(accum, str(tmp_path / "accum"), devices=jax.devices()[:1])
  np.testing.assert_allclose(_losses(str(tmp_path / "accum")), _losses(one), rtol=2e-5)


def test_resume_continues_and_other_model_refuses(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  # The `trained` run's learning-rate schedule (peak 1e-2, 2 warmup + 28 decay steps) in both
  # legs: their train step is that run's program, read from the test run's compilation cache
  # instead of compiled again.
  schedule = {"opt.lr": 1e-2, "opt.decay_steps": 28}
  trainer.train_and_evaluate(tiny_config(data_dir, **{"train.num_steps": 3}, **schedule),
                             workdir)
  trainer.train_and_evaluate(tiny_config(data_dir, **{"train.num_steps": 6}, **schedule),
                             workdir)
  assert sorted(read_metrics(workdir)) == [1, 2, 3, 4, 5, 6]
  other = tiny_config(data_dir, **{"train.num_steps": 8, "model.num_layers": 3,
                                   "model.mlp_dim": 96})
  with pytest.raises(ValueError, match="model.mlp_dim: checkpoint has 64, config has 96") as e:
    trainer.train_and_evaluate(other, workdir)
  assert "model.num_layers" in str(e.value)


def test_nan_loss_stops_with_the_step(data_dir, tmp_path):
  config = tiny_config(data_dir, **{"opt.lr": 1e12, "opt.clip_norm": 0.0,
                                    "opt.warmup_steps": 0, "train.num_steps": 20})
  with pytest.raises(FloatingPointError, match=r"at step \d+"):
    trainer.train_and_evaluate(config, str(tmp_path))
  # The non-finite state was never checkpointed.
  saved = checkpoint.checkpoint_dir(str(tmp_path))
  assert not (saved.exists() and any(p.name.isdigit() for p in saved.iterdir())) or all(
      np.isfinite(leaf).all() for leaf in jax.tree.leaves(checkpoint.load_model(str(tmp_path))[1]))


@pytest.mark.parametrize("overrides, message", [
    ({"data.global_batch_size": 6, "mesh.data": 4, "mesh.fsdp": 2}, "data.global_batch_size=6"),
    ({"mesh.tensor": 8, "mesh.data": 1}, "not divisible by mesh.tensor=8"),
    ({"model.num_heads": 3}, "model.num_heads=3"),
    ({"mesh.data": 3}, "config.mesh"),
    ({"data.seq_len": 128}, "data.seq_len=128"),
    ({"model.vocab_size": 100}, "model.vocab_size=100"),
    ({"data.name": "lm1b"}, "data.name"),
])
def test_bad_config_errors_name_the_field(data_dir, tmp_path, overrides, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    trainer.train_and_evaluate(tiny_config(data_dir, **overrides), str(tmp_path))


def test_pallas_attention_trains_like_the_reference(data_dir, tmp_path, four_steps):
  """attention_impl=pallas (interpret mode, per-shard on a 2x2x2 mesh) matches xla."""
  _, xla = four_steps
  config = tiny_config(data_dir, **_FOUR_STEPS_SHARDED, **{"model.attention_impl": "pallas",
                                                            "checkpoint.every_steps": 100})
  trainer.train_and_evaluate(config, str(tmp_path / "pallas"))
  np.testing.assert_allclose(_losses(str(tmp_path / "pallas")), _losses(xla), rtol=1e-4)
