"""The diffusion UNet family ('unet'): a diffusers `UNet2DModel` for NHWC images.

  config.py     UNetConfig (the `config.model` fields), checks, FLOPs per example
  model.py      the Flax module `UNet` (layers in layers/unet/)
  diffusers.py  diffusers UNet2DModel save_pretrained directories, both ways
  diffusers_scheduler.py  their scheduler_config.json <-> config.diffusion / config.sample
  schedule.py   the forward (noising) process: betas, noising, targets, loss weights
  sampling.py   DDPM and DDIM steps, the sampling loop, classifier-free guidance
"""

from models.family import ModelFamily
from models.unet import diffusers
from models.unet.config import UNetConfig
from models.unet.model import UNet

FAMILY = ModelFamily(config_class=UNetConfig, model_class=UNet,
                     converters={"unet2d": diffusers.UNET2D})
