"""Parity with random, fully perturbed diffusers UNet2DModels, and the converter both ways."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import diffusers_models
from models.unet import diffusers as unet_diffusers
from models.unet.model import UNet

pytest.importorskip("torch")
pytest.importorskip("diffusers")

TIMESTEPS = np.array([0, 3, 250, 999], np.int64)


@pytest.fixture(scope="module", params=["DDPM_CIFAR10_SMALL", "CLASS_CONDITIONAL_SMALL"])
def saved(request, tmp_path_factory):
  """(diffusers config, the torch model, its save_pretrained directory)."""
  config = getattr(diffusers_models, request.param)
  save_dir = str(tmp_path_factory.mktemp(request.param.lower()))
  return config, diffusers_models.make_unet2d(config, save_dir), save_dir


def _inputs(config: dict):
  rng = np.random.default_rng(0)
  size = config["sample_size"]
  images = rng.standard_normal((len(TIMESTEPS), size, size, config["in_channels"]))
  labels = np.array([0, 4, 2, 1]) if config.get("num_class_embeds") else None
  return images.astype(np.float32), labels


def _treadle_predict(cfg, params, images, labels):
  with jax.default_matmul_precision("highest"):
    # One jitted program: op-by-op dispatch of the eager UNet compiles every op.
    out = jax.jit(UNet(cfg).apply)({"params": params}, images, TIMESTEPS,
                                   None if labels is None else jnp.asarray(labels))
  return np.asarray(out)


def test_matches_diffusers_and_exports_back(saved, tmp_path):
  config, model, save_dir = saved
  cfg, params = unet_diffusers.read_checkpoint(save_dir)
  assert cfg.flip_sin_to_cos == config["flip_sin_to_cos"]
  assert cfg.downsample_padding == config["downsample_padding"]
  images, labels = _inputs(config)
  want = diffusers_models.unet2d_predict(model, images, TIMESTEPS, labels)
  got = _treadle_predict(cfg, params, images, labels)
  assert got.shape == images.shape[:3] + (config["out_channels"],)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  import diffusers  # pylint: disable=g-import-not-at-top
  paths = unet_diffusers.write_checkpoint(str(tmp_path), cfg, {"params": params})
  assert sorted(os.path.basename(p) for p in paths) == [
      "config.json", "diffusion_pytorch_model.safetensors"]
  exported = diffusers.UNet2DModel.from_pretrained(str(tmp_path)).float().eval()
  again = diffusers_models.unet2d_predict(exported, images, TIMESTEPS, labels)
  np.testing.assert_allclose(again, want, atol=1e-5, rtol=0)


def test_read_refuses_unsupported_fields():
  unet_config = dict(diffusers_models.DDPM_CIFAR10_SMALL, resnet_time_scale_shift="scale_shift",
                     center_input_sample=True, attn_norm_num_groups=1, class_embed_type="timestep")
  with pytest.raises(ValueError) as error:
    unet_diffusers.model_config_from_diffusers(unet_config)
  for name in ("resnet_time_scale_shift", "center_input_sample", "attn_norm_num_groups",
               "class_embed_type"):
    assert name in str(error.value)
  supported = unet_diffusers.model_config_from_diffusers(diffusers_models.DDPM_CIFAR10_SMALL)
  assert supported["attention_head_dim"] == 0 and supported["freq_shift"] == 1


def test_read_takes_a_pipeline_directory(saved, tmp_path):
  """A pipeline directory (unet/ and scheduler/) reads like its unet/ folder, with the
  scheduler's settings."""
  config, _, save_dir = saved
  os.symlink(save_dir, tmp_path / "unet")
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(
      '{"_class_name": "DDIMScheduler", "num_train_timesteps": 500}')
  cfg, params = unet_diffusers.read_checkpoint(str(tmp_path))
  assert cfg.block_out_channels == tuple(config["block_out_channels"])
  assert params["conv_in"]["kernel"].shape[:3] == (3, 3, config["in_channels"])
  settings = unet_diffusers.UNET2D.read_run_settings(str(tmp_path))
  assert settings["diffusion.num_train_timesteps"] == 500 and settings["sample.sampler"] == "ddim"
  (tmp_path / "scheduler" / "scheduler_config.json").write_text("{not json")
  with pytest.raises(json.JSONDecodeError):
    unet_diffusers.UNET2D.read_run_settings(str(tmp_path))


def test_read_names_a_missing_tensor(saved, tmp_path):
  _, _, save_dir = saved
  from models import hf_io  # pylint: disable=g-import-not-at-top
  unet_config, tensors = hf_io.read_hf_dir(save_dir)
  del tensors["mid_block.attentions.0.to_q.bias"]
  cfg = unet_diffusers.UNetConfig.from_dict(
      unet_diffusers.model_config_from_diffusers(unet_config))
  with pytest.raises(ValueError, match="mid_block.attentions.0.to_q.bias"):
    unet_diffusers.params_from_diffusers(tensors, cfg)


def test_read_takes_deprecated_attention_names(saved):
  """google/ddpm-cifar10-32's safetensors name the attention projections query, key, value
  and proj_attn."""
  _, _, save_dir = saved
  from models import hf_io  # pylint: disable=g-import-not-at-top
  unet_config, tensors = hf_io.read_hf_dir(save_dir)
  cfg = unet_diffusers.UNetConfig.from_dict(
      unet_diffusers.model_config_from_diffusers(unet_config))
  old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for name, w in tensors.items():
    for new, old in old_names.items():
      name = name.replace(f".{new}.", f".{old}.")
    renamed[name] = w
  assert any(".proj_attn." in name for name in renamed)
  old = unet_diffusers.params_from_diffusers(renamed, cfg)
  new = unet_diffusers.params_from_diffusers(tensors, cfg)
  jax.tree.map(np.testing.assert_array_equal, old, new)
