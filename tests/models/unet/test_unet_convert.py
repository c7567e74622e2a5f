"""`python -m train.convert` for diffusers UNets: the weights and the scheduler both ways,
then fine-tuning and sampling the imported workdir through the normal binaries."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import finetune
from helpers import REPO_ROOT, diffusers_models, xla_flags
from helpers.trainer import set_fields
from models.unet import diffusers_scheduler
from train import checkpoint, convert, sample, trainer
from train.data.images import shapes

pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Trains on the embedded 32x32 shapes: 8 classes + the null class of label dropout.
# One level with attention: the least to compile (the parity tests cover deeper UNets).
SHAPES_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16,),
    down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",),
    layers_per_block=1, norm_num_groups=4, num_class_embeds=shapes.NUM_CLASSES + 1)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """A perturbed UNet2DModel + a cosine, v-prediction DDPMScheduler, imported by the CLI."""
  src = str(tmp_path_factory.mktemp("diffusers"))
  model = diffusers_models.make_unet2d(SHAPES_UNET, src, seed=3)
  diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                          timestep_spacing="trailing").save_pretrained(src)
  workdir = str(tmp_path_factory.mktemp("workdir"))
  result = subprocess.run(
      [sys.executable, "-m", "train.convert", "import", "--model=unet2d", src, workdir],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1)))
  assert result.returncode == 0, result.stderr[-2000:]
  return model, workdir


def test_import_keeps_the_schedule_and_the_predictions(imported):
  model, workdir = imported
  config = checkpoint.load_config(workdir)
  assert config.model.family == "unet" and config.data.name == "treadle_shapes"
  assert (config.diffusion.beta_schedule, config.diffusion.prediction_type,
          config.sample.spacing) == ("cosine", "v_prediction", "trailing")
  unet, variables = checkpoint.load_model(workdir)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  timesteps, labels = np.array([7, 700]), np.array([1, 8])
  want = diffusers_models.unet2d_predict(model, images, timesteps, labels)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(unet.apply)(variables, images, timesteps, labels)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_export_writes_weights_and_scheduler_diffusers_loads(imported, tmp_path):
  model, workdir = imported
  dst = str(tmp_path / "exported")
  written = convert.export_checkpoint("unet2d", workdir, dst)
  assert sorted(os.path.basename(p) for p in written) == [
      "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]
  scheduler = diffusers.DDPMScheduler.from_pretrained(dst)
  reference = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
  np.testing.assert_array_equal(scheduler.alphas_cumprod.numpy(),
                                reference.alphas_cumprod.numpy())
  assert scheduler.config.prediction_type == "v_prediction"
  images = np.random.default_rng(1).standard_normal((1, 32, 32, 3)).astype(np.float32)
  args = (images, np.array([500]), np.array([2]))
  reloaded = diffusers.UNet2DModel.from_pretrained(dst).float().eval()
  np.testing.assert_allclose(diffusers_models.unet2d_predict(reloaded, *args),
                             diffusers_models.unet2d_predict(model, *args), atol=1e-5)


def test_unsupported_scheduler_settings_are_refused():
  with pytest.raises(ValueError, match=r"thresholding=True .*variance_type='learned_range'"):
    diffusers_scheduler.run_settings({"thresholding": True, "variance_type": "learned_range"})


@pytest.mark.slow  # Import, parity and export stay in the default suite; training: test_diffusion_task.
def test_finetune_and_sample_the_import(imported, tmp_path):
  _, workdir = imported
  config = finetune.get_config(f"workdir={workdir}")
  set_fields(config, {"data.data_dir": str(tmp_path / "tfds"), "data.name": "treadle_shapes/tiny",
                      "data.global_batch_size": 8, "train.num_steps": 2, "evals.every_steps": 0,
                      "opt.warmup_steps": 0, "opt.lr": 1e-4, "diffusion.label_dropout": 0.1,
                      "sample.num_steps": 2, "sample.num_per_class": 1,
                      "sample.num_scored": 0})
  trainer.train_and_evaluate(config, workdir)
  assert os.path.exists(os.path.join(workdir, "samples", "step_2.png"))
  assert sample.sample(workdir, [3], num_steps=2).shape == (1, 32, 32, 3)
