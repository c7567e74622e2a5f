"""The diffusion UNet's layers (diffusers `UNet2DModel` family), images NHWC.

  timestep.py     sinusoidal timestep features and the time-embedding MLP
  conv.py         `Conv2D`: a 2-D convolution with explicit padding and named axes
  group_norm.py   `GroupNorm` over the channel axis, in float32
  resample.py     `Downsample2D` (stride-2 conv) and `Upsample2D` (nearest x2, conv)
  resnet.py       `ResnetBlock2D`: two convs, a time-embedding shift, a shortcut
  attention.py    `SpatialSelfAttention`: non-causal attention over the H·W positions
  blocks.py       the down, mid and up blocks that the model stacks

Shapes: see layers/__init__.py (b batch, H height, W width, c channels).
"""

from layers.unet.attention import SpatialSelfAttention
from layers.unet.blocks import BlockOptions, DownBlock2D, MidBlock2D, UpBlock2D
from layers.unet.conv import Conv2D
from layers.unet.group_norm import GroupNorm
from layers.unet.resample import Downsample2D, Upsample2D
from layers.unet.resnet import ResnetBlock2D
from layers.unet.timestep import TimestepEmbedding, sinusoidal_embedding

__all__ = [
    "BlockOptions", "Conv2D", "DownBlock2D", "Downsample2D", "GroupNorm", "MidBlock2D",
    "ResnetBlock2D", "SpatialSelfAttention", "TimestepEmbedding", "UpBlock2D", "Upsample2D",
    "sinusoidal_embedding",
]
