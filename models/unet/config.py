"""`config.model` of the diffusion UNet family ('unet'): fields, defaults, checks, FLOPs.

Field names follow diffusers' `UNet2DModel` (sample_size is `image_size`; None
in diffusers is 0 here). The defaults are a tiny CPU model for 32x32 RGB
images: 0.28M parameters, 0.16 GFLOPs forward per image; forward + backward
of 32 images in float32 takes 0.23-0.35 s on 2 shared CPU cores ((32, 64, 64)
channels: 1.1M parameters, 0.46-0.8 s; bfloat16 is slower on CPU). Shapes:
see layers/__init__.py (H height, W width, c channels).
"""

import dataclasses
from typing import ClassVar

from layers import attention as attention_lib
from models.config_schema import ModelConfig, field
from models.llama.config import REMAT_POLICIES, check_choice, check_dtype_names

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")


def _conv_flops(size: int, c_in: int, c_out: int, taps: int = 9) -> int:
  """Multiply-adds x 2 of a conv producing a [size, size, c_out] map."""
  return 2 * size * size * taps * c_in * c_out


def _attention_flops(size: int, c: int) -> int:
  """q, k, v and output projections plus scores and weighted values over t = size² positions."""
  t = size * size
  return 4 * 2 * t * c * c + 2 * 2 * t * t * c


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig(ModelConfig):
  """A diffusers UNet2DModel: conv_in, down blocks, a mid block, up blocks with skips, conv_out."""
  family: ClassVar[str] = "unet"
  modality: ClassVar[str] = "images"

  image_size: int = field(32, "Height and width of the (square) images (diffusers sample_size).")
  in_channels: int = field(3, "Channels of the input images.")
  out_channels: int = field(3, "Channels of the prediction.")
  block_out_channels: tuple[int, ...] = field(
      (16, 32, 32), "Channels of each resolution level, highest resolution first.")
  down_block_types: tuple[str, ...] = field(
      ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
      "One per level: DownBlock2D | AttnDownBlock2D (resnets followed by attention).")
  up_block_types: tuple[str, ...] = field(
      ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
      "One per level, lowest resolution first: UpBlock2D | AttnUpBlock2D.")
  layers_per_block: int = field(1, "Resnets per down block (up blocks get one more).")
  attention_head_dim: int = field(0, "Channels per attention head; 0 = one head per layer.")
  norm_num_groups: int = field(4, "GroupNorm groups; divides every block's channels.")
  norm_eps: float = field(1e-5, "GroupNorm epsilon.")
  flip_sin_to_cos: bool = field(True, "Timestep features as [cos | sin] (else [sin | cos]).")
  freq_shift: int = field(0, "Timestep frequency shift (DDPM's original embedding: 1).")
  downsample_padding: int = field(1, "1 pads downsampling convs on all sides; 0 at the "
                                  "bottom and right only (DDPM's original).")
  num_class_embeds: int = field(0, "Classes of a class-conditional model; 0 = unconditional.")
  dropout: float = field(0.0, "Resnet dropout rate.", shapes_params=False)
  attention_impl: str = field("auto", "xla | cudnn | pallas | auto.", shapes_params=False)
  attention_chip: str = field("", "Pallas kernel target (h100, tpu_v5e, ...); '' = this "
                              "machine's.", shapes_params=False)
  remat_policy: str = field("none", "none | full | dots_saveable | "
                            "dots_with_no_batch_dims_saveable (per resnet and attention "
                            "layer).", shapes_params=False)
  dtype: str = field("float32", "Computation dtype (norms and softmax stay float32).",
                     shapes_params=False)
  param_dtype: str = field("float32", "Parameter storage dtype.")

  def __post_init__(self):
    for name in ("image_size", "in_channels", "out_channels", "layers_per_block",
                 "norm_num_groups"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"model.{name}={getattr(self, name)} must be positive.")
    channels = self.block_out_channels
    if not channels or min(channels) <= 0:
      raise ValueError(f"model.block_out_channels={channels} must be one or more positive "
                       "channel counts, highest resolution first.")
    for name, choices in (("down_block_types", DOWN_BLOCK_TYPES),
                          ("up_block_types", UP_BLOCK_TYPES)):
      types = getattr(self, name)
      if len(types) != len(channels):
        raise ValueError(f"model.{name} has {len(types)} entries but model.block_out_channels "
                         f"has {len(channels)}: give one block type per level.")
      for kind in types:
        if kind not in choices:
          raise ValueError(f"model.{name} holds {kind!r}; choose from {choices}.")
    for c in channels:
      if c % self.norm_num_groups:
        raise ValueError(f"model.block_out_channels={channels}: {c} is not divisible by "
                         f"model.norm_num_groups={self.norm_num_groups}; choose a group count "
                         "that divides every level's channels.")
    if self.attention_head_dim < 0:
      raise ValueError(f"model.attention_head_dim={self.attention_head_dim} must be >= 0 "
                       "(0 = one head per attention layer).")
    if self.attention_head_dim:
      for c in channels:
        if c % self.attention_head_dim:
          raise ValueError(f"model.attention_head_dim={self.attention_head_dim} does not divide "
                           f"{c} of model.block_out_channels={channels}; choose a head dim "
                           "that divides every level's channels, or 0 for one head.")
    if self.image_size % self.downsampling_factor:
      raise ValueError(f"model.image_size={self.image_size} is not divisible by "
                       f"{self.downsampling_factor} (2 ** {len(channels) - 1} downsamplings for "
                       f"{len(channels)} levels of model.block_out_channels): choose an image "
                       "size that is, or fewer levels.")
    if channels[0] // 2 == self.freq_shift:
      raise ValueError(f"model.freq_shift={self.freq_shift} equals half of "
                       f"model.block_out_channels[0]={channels[0]} (division by zero in the "
                       "timestep frequencies); use 0 or 1.")
    if self.downsample_padding not in (0, 1):
      raise ValueError(f"model.downsample_padding={self.downsample_padding}; choose 1 (all "
                       "sides) or 0 (bottom and right).")
    if self.num_class_embeds < 0:
      raise ValueError(f"model.num_class_embeds={self.num_class_embeds} must be >= 0 "
                       "(0 = unconditional).")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"model.dropout={self.dropout} must be in [0, 1).")
    if self.norm_eps <= 0:
      raise ValueError(f"model.norm_eps={self.norm_eps} must be positive.")
    check_choice("attention_impl", self.attention_impl, attention_lib.IMPLEMENTATIONS)
    check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
    check_dtype_names(self)

  @property
  def downsampling_factor(self) -> int:
    """How much the lowest resolution is smaller than the images: 2 ** (levels - 1)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def time_embed_dim(self) -> int:
    """Width of the time (and class) embedding: 4 · block_out_channels[0]."""
    return 4 * self.block_out_channels[0]

  def on_chip(self, chip):
    return self if self.attention_chip else dataclasses.replace(self, attention_chip=chip)

  def sharded_sizes(self):
    # Kernel input channels are split over the mesh axes 'channels_in' maps to (fsdp):
    # the first level's channels feed the time MLP; every level feeds its convs.
    return {f"block_out_channels[{i}]": ("channels_in", c)
            for i, c in enumerate(self.block_out_channels)}

  def forward_flops_per_example(self) -> int:
    """Matmul and conv FLOPs of one image's forward pass (norms and activations not counted)."""
    c, e, layers = self.block_out_channels, self.time_embed_dim, self.layers_per_block
    size = self.image_size

    def resnet(s, ci, co):
      shortcut = _conv_flops(s, ci, co, taps=1) if ci != co else 0
      return _conv_flops(s, ci, co) + _conv_flops(s, co, co) + 2 * e * co + shortcut

    flops = 2 * (c[0] * e + e * e) + _conv_flops(size, self.in_channels, c[0])
    skips, channels = [c[0]], c[0]
    for level, kind in enumerate(self.down_block_types):
      for _ in range(layers):
        flops += resnet(size, channels, c[level])
        channels = c[level]
        flops += _attention_flops(size, channels) if kind.startswith("Attn") else 0
        skips.append(channels)
      if level < len(c) - 1:
        size //= 2
        flops += _conv_flops(size, channels, channels)
        skips.append(channels)
    flops += 2 * resnet(size, channels, channels) + _attention_flops(size, channels)
    for level, kind in enumerate(self.up_block_types):
      out = c[len(c) - 1 - level]
      for _ in range(layers + 1):
        flops += resnet(size, channels + skips.pop(), out)
        channels = out
        flops += _attention_flops(size, channels) if kind.startswith("Attn") else 0
      if level < len(c) - 1:
        size *= 2
        flops += _conv_flops(size, channels, channels)
    return flops + _conv_flops(size, c[0], self.out_channels)

  def train_flops_per_example(self) -> float:
    """Forward + backward FLOPs of one training image: 3 x the forward pass."""
    return 3.0 * self.forward_flops_per_example()

  def train_flops_per_token(self, seq_len: int) -> None:
    """Images have no tokens: use `train_flops_per_example`."""
    del seq_len
    return None
