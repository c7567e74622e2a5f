"""Random, fully perturbed diffusers `UNet2DModel`s saved locally, for parity and conversion tests.

Needs torch and diffusers (test-only dependencies); callers skip without them.
"""

import numpy as np

# Two small UNet2DModel architectures: google/ddpm-cifar10-32's scaled down
# (DDPM's original time embedding and padding, attention at the 2nd level) and
# a class-conditional one with diffusers' defaults for both.
DDPM_CIFAR10_SMALL = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, attention_head_dim=None, norm_num_groups=8, norm_eps=1e-6,
    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0)
CLASS_CONDITIONAL_SMALL = dict(
    sample_size=8, in_channels=2, out_channels=3, block_out_channels=(16, 32),
    down_block_types=("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D"), layers_per_block=1, attention_head_dim=8,
    norm_num_groups=4, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1, num_class_embeds=5)


def make_unet2d(config: dict, save_dir: str, seed: int = 0):
  """A `UNet2DModel(**config)` with 0.1·randn added to every parameter, saved to `save_dir`."""
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**config).float().eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  model.save_pretrained(save_dir)
  return model


def unet2d_predict(model, images_nhwc: np.ndarray, timesteps: np.ndarray,
                   labels: np.ndarray | None = None) -> np.ndarray:
  """The diffusers model's float32 prediction for NHWC numpy images, as NHWC numpy."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    sample = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    kwargs = {} if labels is None else {"class_labels": torch.from_numpy(labels)}
    out = model(sample, torch.from_numpy(timesteps), **kwargs).sample
  return out.numpy().transpose(0, 2, 3, 1)
