"""The diffusion task: config checks, the objective, sharded training, EMA, report and sampling."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import REPO_ROOT, xla_flags
from helpers.trainer import read_metrics, tiny_config
from models.unet import schedule as schedule_lib
from train import checkpoint, families, sample, trainer
from train.data.images import shapes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("overrides, message", [
    ({"model.num_class_embeds": 5}, r"model.num_class_embeds=5 must be 9: the 8 classes"),
    ({"diffusion.label_dropout": 0.0}, r"model.num_class_embeds=9 must be 8"),
    ({"model.num_class_embeds": 0}, r"diffusion.label_dropout=0.1 applies to class-conditional"),
    ({"model.num_class_embeds": 8, "diffusion.label_dropout": 0.0,
      "sample.guidance_scale": 2.0}, r"sample.guidance_scale=2.0 needs"),
    ({"data.image_size": 16}, r"data.image_size=16, data.image_channels=3 must equal"),
    ({"diffusion.prediction_type": "noise"}, r"diffusion.prediction_type"),
    ({"sample.num_steps": 5000}, r"sample.num_steps=5000"),
])
def test_config_errors_name_the_field(data_dir, tmp_path, overrides, message):
  config = tiny_config(data_dir, family="unet", **overrides)
  with pytest.raises(ValueError, match=message):
    trainer.Trainer(config, str(tmp_path))


class _Oracle:
  """Stands in for the UNet: predicts the exact target from the noised image and the clean
  images it was given (so the task's loss must be zero)."""

  def __init__(self, clean, schedule, config):
    self.clean, self.schedule, self.config = clean, schedule, config

  def apply(self, variables, noisy, timesteps, labels, **kwargs):
    del variables, labels, kwargs
    alpha_bar = self.schedule.alphas_cumprod[timesteps][:, None, None, None]
    noise = (noisy - jnp.sqrt(alpha_bar) * self.clean) / jnp.sqrt(1 - alpha_bar)
    return schedule_lib.training_target(self.schedule, self.clean, noise, timesteps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_an_exact_prediction_has_zero_loss(data_dir, prediction_type):
  config = tiny_config(data_dir, family="unet", **{
      "diffusion.prediction_type": prediction_type, "diffusion.min_snr_gamma": 5.0,
      "diffusion.beta_schedule": "cosine"})
  task = families.get_family("unet").task
  images = jax.random.uniform(jax.random.PRNGKey(1), (6, 32, 32, 3), minval=-1, maxval=1)
  batch = {"images": images, "labels": jnp.arange(6, dtype=jnp.int32)}
  oracle = _Oracle(images, schedule_lib.make_schedule(
      "cosine", prediction_type=prediction_type), config.model)
  loss, metrics = task.loss_sums(oracle, {}, batch, jax.random.PRNGKey(0), config, train=True)
  assert float(metrics["weight"]) == 6
  np.testing.assert_allclose(float(loss), 0.0, atol=2e-3)

  class _Zero(_Oracle):
    def apply(self, *args, **kwargs):
      return jnp.zeros_like(super().apply(*args, **kwargs))
  zero_loss, _ = task.loss_sums(_Zero(images, oracle.schedule, config.model), {}, batch,
                                jax.random.PRNGKey(0), config, train=True)
  assert float(zero_loss) > 0.1


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """The tiny UNet trained 4 steps on 8 devices (data x fsdp x tensor) and on 1, on batches
  of 4 images (one per data x fsdp shard)."""
  eight, one = str(tmp_path_factory.mktemp("eight")), str(tmp_path_factory.mktemp("one"))
  overrides = {"train.num_steps": 4, "checkpoint.every_steps": 4, "evals.every_steps": 4,
               "evals.num_batches": 1, "opt.lr": 1e-3, "data.global_batch_size": 4}
  sharded = tiny_config(data_dir, family="unet", **overrides, **{
      "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "sample.num_scored": 8})
  final = trainer.train_and_evaluate(sharded, eight)
  # The one-device run only provides losses: no evaluation, a one-step sampler.
  trainer.train_and_evaluate(tiny_config(data_dir, family="unet", **dict(
      overrides, **{"evals.every_steps": 0, "sample.num_steps": 1})), one,
                             devices=jax.devices()[:1])
  return eight, one, final


def test_sharded_losses_match_one_device(trained):
  eight, one, _ = trained
  losses = [[m["loss"] for _, m in sorted(read_metrics(w).items())] for w in (eight, one)]
  assert len(losses[0]) == 4 and np.all(np.isfinite(losses[0]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=2e-5)
  assert read_metrics(eight)[4]["examples_per_sec"] > 0


def test_report_writes_a_grid_and_scores_samples(trained):
  eight, _, final = trained
  grid = np.asarray(Image.open(os.path.join(eight, "samples", "step_4.png")))
  # One row per class, one column (sample.num_per_class=1), 32-pixel images + padding.
  assert grid.shape[0] >= shapes.NUM_CLASSES * 32 and grid.shape[1] < 2 * 32
  for key in ("real_class_accuracy", "sample_class_accuracy", "noise_class_accuracy"):
    assert 0.0 <= final[key] <= 1.0
  assert final["real_class_accuracy"] > 0.8  # The probe itself works on real images.


def test_sampling_uses_the_ema_and_the_flags(trained):
  eight, _, _ = trained
  model, ema = checkpoint.load_model(eight)
  _, raw = checkpoint.load_model(eight, use_ema=False)
  leaves = zip(jax.tree.leaves(ema["params"]), jax.tree.leaves(raw["params"]))
  assert any(not np.array_equal(a, b) for a, b in leaves)
  images = sample.sample(eight, [0, 3], num_steps=2)
  assert images.shape == (2, 32, 32, 3) and np.abs(images).max() <= 1.0
  guided = sample.sample(eight, [0, 3], num_steps=2, guidance_scale=3.0)
  assert not np.allclose(images, guided)
  with pytest.raises(ValueError, match="--temperature does not apply"):
    sample.sample(eight, [0], temperature=0.5)
  with pytest.raises(ValueError, match="Class label 8 is not in"):
    sample.sample(eight, [8], num_steps=2)


def test_sample_cli_writes_the_grid(trained, tmp_path):
  eight, _, _ = trained
  output = str(tmp_path / "grid.png")
  result = subprocess.run(
      [sys.executable, "-m", "train.sample", f"--workdir={eight}", "--class_label=1",
       "--class_label=2", "--num_per_class=3", "--num_steps=2", "--sampler=ddpm",
       f"--output={output}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1)))
  assert result.returncode == 0, result.stderr[-2000:]
  assert output in result.stdout
  rows, cols = np.asarray(Image.open(output)).shape[:2]
  assert rows < 3 * 32 <= cols  # Two rows of three.
