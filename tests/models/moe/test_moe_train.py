"""End-to-end: the MoE family trains sharded over the expert axis, logs routing
metrics, updates and checkpoints its balance bias, resumes and samples."""

import jax
import numpy as np
import pytest

from models import moe
from train import checkpoint, sample, trainer
from helpers.trainer import read_metrics, tiny_config

MOE = {"model.moe.num_experts": 4, "model.moe.num_experts_per_token": 2,
       "model.moe.expert_mlp_dim": 32, "model.moe.first_dense_layers": 1, "model.num_layers": 3,
       "model.moe.bias_update_rate": 1e-2, "model.moe.seq_aux_loss": 1e-3}


def moe_config(data_dir, **overrides):
  return tiny_config(data_dir, family="moe", **dict(MOE, **overrides))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _losses(workdir):
  return [m["loss"] for _, m in sorted(read_metrics(workdir).items())]


def _bias(workdir) -> np.ndarray:
  _, variables = checkpoint.load_model(workdir)
  return np.asarray(moe.stack_moe_layers(variables["balance"])["bias"])


# Slow: tests/layers/moe/test_moe_layers.py checks expert parallelism = one device per layer.
@pytest.mark.parametrize("impl", [pytest.param("dropless", marks=pytest.mark.slow),
                                  pytest.param("capacity", marks=pytest.mark.slow)])
def test_expert_parallel_matches_one_device(data_dir, tmp_path, impl):
  """Experts over mesh.expert=4 (tokens over data=2 x expert=4) equal one device."""
  overrides = {"train.num_steps": 3, "model.moe.impl": impl}
  trainer.train_and_evaluate(moe_config(data_dir, **overrides), str(tmp_path / "one"),
                             devices=jax.devices()[:1])
  sharded = moe_config(data_dir, **overrides, **{"mesh.data": 2, "mesh.expert": 4})
  trainer.train_and_evaluate(sharded, str(tmp_path / "eight"))
  np.testing.assert_allclose(_losses(str(tmp_path / "eight")), _losses(str(tmp_path / "one")),
                             rtol=2e-5)
  np.testing.assert_allclose(_bias(str(tmp_path / "eight")), _bias(str(tmp_path / "one")))


def test_metrics_bias_resume_and_sampling(data_dir, tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  # A fixed decay length, so the 3-step run's schedule is the 6-step run's.
  schedule = {"opt.decay_steps": 10}
  config = moe_config(data_dir, **{"train.num_steps": 6}, **schedule)
  trainer.train_and_evaluate(config, straight)

  logged = read_metrics(straight)[6]
  load = np.asarray(logged["moe/expert_load"])
  assert load.shape == (2, 4)  # [MoE layers, experts]
  np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)
  assert logged["moe/load_imbalance"] >= 1.0 and logged["moe/dropped_fraction"] == 0.0
  assert logged["moe/load_balance_loss"] > 0 and logged["moe/router_z_loss"] > 0
  # Six updates of +-0.01 (the bias moves every step, outside the gradient).
  bias = _bias(straight)
  assert np.abs(bias).max() > 0 and np.all(np.abs(bias) <= 6 * 1e-2 + 1e-6)
  assert logged["moe/bias_range"][0] > 0

  # Stopping at step 3 and resuming gives the same losses and the same bias.
  trainer.train_and_evaluate(moe_config(data_dir, **{"train.num_steps": 3}, **schedule),
                             resumed)
  trainer.train_and_evaluate(config, resumed)
  np.testing.assert_array_equal(_losses(resumed), _losses(straight))
  np.testing.assert_array_equal(_bias(resumed), bias)

  texts = sample.sample(straight, ["1+2=", "The "], max_new_tokens=4)
  assert len(texts) == 2 and all(isinstance(text, str) for text in texts)


def test_bias_update_rule():
  """b += rate * sign(mean_load - load) per layer; rate 0 leaves the state alone."""
  from train.tasks import moe_language_model  # pylint: disable=g-import-not-at-top
  task = moe_language_model.MoeLanguageModelTask(moe.FAMILY)
  state = {"balance": {"layers_1": {"moe": {"bias": np.zeros(3, np.float32)}},
                       "layers_2": {"moe": {"bias": np.full(3, 0.5, np.float32)}}}}
  load = np.array([[1.0, 2.0, 6.0], [3.0, 3.0, 3.0]])  # [layers, experts]
  def model_with(rate):
    return moe.Moe(moe.MoeConfig(moe=moe.MoeLayerConfig(bias_update_rate=rate)))
  updated = task.update_model_state(state, {"moe/expert_tokens": load}, model_with(0.1))
  np.testing.assert_allclose(updated["balance"]["layers_1"]["moe"]["bias"], [0.1, 0.1, -0.1])
  np.testing.assert_allclose(updated["balance"]["layers_2"]["moe"]["bias"], [0.5, 0.5, 0.5])
  assert task.update_model_state(state, {"moe/expert_tokens": load}, model_with(0.0)) is state


def test_experts_must_divide_the_expert_axis(data_dir, tmp_path):
  config = moe_config(data_dir, **{"model.moe.num_experts": 6, "mesh.expert": 4, "mesh.data": 2})
  with pytest.raises(ValueError, match="model.moe.num_experts=6 is not divisible by mesh.expert=4"):
    trainer.train_and_evaluate(config, str(tmp_path))
