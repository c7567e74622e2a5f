"""The EMA of the parameters: its decay ramp, its update in the train step, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from models.llama import LlamaConfig
from train import checkpoint, state as state_lib, steps, trainer
from helpers.trainer import tiny_config


def _opt(**values):
  opt = base.get_base_config(LlamaConfig()).opt
  opt.update(values)
  return opt


def test_decay_ramps_then_caps():
  opt = _opt(ema_decay=0.999)
  got = [float(steps.ema_decay(jnp.int32(s), opt)) for s in (0, 10, 10_000)]
  np.testing.assert_allclose(got, [1 / 10, 11 / 20, 0.999], rtol=1e-6)
  warm = _opt(ema_decay=0.999, ema_warmup_power=0.75)
  np.testing.assert_allclose(float(steps.ema_decay(jnp.int32(15), warm)),
                             1 - 16.0 ** -0.75, rtol=1e-6)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(data_dir, **{"train.num_steps": 3, "checkpoint.every_steps": 3,
                                    "opt.ema_decay": 0.5, "sample.max_new_tokens": 1})
  run = trainer.Trainer(config, workdir)
  return run, config, workdir


def test_train_step_moves_the_ema_towards_the_new_params(ema_run):
  run, _, _ = ema_run
  with run.sharding_context():
    state = state_lib.init_state(run.model, run.task, run.optimizer, run.dummy, 0,
                                 run.state_shardings)
    old_ema = jax.device_get(state.ema_params)
    batch = run.global_batch(run.task.dummy_batch(run.config.data,
                                                  run.config.data.global_batch_size))
    state, _ = run.train_step(state, batch)
  decay = 0.1  # min(0.5, (1 + 0) / (10 + 0)) at step 0.
  expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, old_ema,
                          jax.device_get(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(state.ema_params), expected)
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, old_ema,
                                              jax.device_get(state.ema_params))))


def test_checkpoint_keeps_the_ema_and_load_model_prefers_it(ema_run):
  run, _, workdir = ema_run
  run.run()
  _, ema = checkpoint.load_model(workdir)
  _, raw = checkpoint.load_model(workdir, use_ema=False)
  differs = jax.tree.map(lambda a, b: not np.array_equal(a, b), ema["params"], raw["params"])
  assert any(jax.tree.leaves(differs))
