"""Diffusion UNets at published sizes, for GPU/TPU runs on a local TFDS image dataset.

python -m train.main --config=configs/unet.py:size=cifar10 --workdir=DIR \
    --config.data.data_dir=/path/to/tfds
`cifar10` is the architecture of google/ddpm-cifar10-32 (Ho et al. 2020, 35.7M
parameters); `cifar10_cond` adds a class embedding and label dropout for
classifier-free guidance; `mnist` is a small class-conditional model for 28x28
grayscale digits. The dataset must be prepared as array_record in data_dir
(nothing is downloaded at run time).
"""

from configs import base
from configs import common
from models.unet import UNetConfig

_DDPM_CIFAR10 = dict(
    image_size=32, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, norm_num_groups=32, norm_eps=1e-6, flip_sin_to_cos=False,
    freq_shift=1, downsample_padding=0, dropout=0.1)
# size -> (model fields, data fields, classes for conditioning (0: unconditional)).
SIZES = {
    "cifar10": (_DDPM_CIFAR10, dict(name="cifar10", eval_split="test"), 0),
    "cifar10_cond": (_DDPM_CIFAR10, dict(name="cifar10", eval_split="test"), 10),
    "mnist": (dict(image_size=28, in_channels=1, out_channels=1,
                   block_out_channels=(64, 128, 128),
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                   layers_per_block=2, norm_num_groups=32),
              dict(name="mnist", eval_split="test", image_size=28, image_channels=1,
                   random_flip=False), 10),
}


def get_config(arg=None):
  args = common.parse_arg(arg, size="cifar10", batch=128, steps=800_000)
  if args.size not in SIZES:
    raise ValueError(f"Unknown unet size {args.size!r}; choose one of {sorted(SIZES)}.")
  model_fields, data_fields, num_classes = SIZES[args.size]
  conditional = num_classes > 0
  model = UNetConfig(**model_fields, num_class_embeds=num_classes + 1 if conditional else 0)
  config = base.get_base_config(model)
  config.data.update(data_fields)
  config.data.global_batch_size = args.batch
  config.diffusion.label_dropout = 0.1 if conditional else 0.0
  o = config.opt
  o.lr, o.warmup_steps, o.weight_decay, o.b2 = 2e-4, 5000, 0.0, 0.999
  o.ema_decay, o.ema_warmup_power = 0.9999, 0.0
  config.train.num_steps = args.steps
  config.train.log_every_steps = 100
  config.evals.every_steps = 5000
  config.checkpoint.every_steps = 5000
  config.sample.num_steps = 100
  config.lock()
  return config
