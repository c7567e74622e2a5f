"""The UNet's down, mid and up blocks (diffusers' DownBlock2D / AttnDownBlock2D,
UNetMidBlock2D, UpBlock2D / AttnUpBlock2D), each a few resnets with optional attention.

Shapes: b batch, H height, W width, c channels; e the time-embedding width.
"""

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.unet.attention import SpatialSelfAttention
from layers.unet.resample import Downsample2D, Upsample2D
from layers.unet.resnet import ResnetBlock2D


@dataclasses.dataclass(frozen=True)
class BlockOptions:
  """What every resnet and attention layer of a UNet shares.

  Attributes:
    num_groups: GroupNorm groups (norm_num_groups).
    eps: GroupNorm epsilon (norm_eps).
    head_dim: attention channels per head; 0 means one head per layer.
    dropout: resnet dropout rate.
    attention_impl: 'auto' | 'xla' | 'cudnn' | 'pallas'.
    attention_chip: the Pallas kernel's target chip ('' = this machine's).
    remat: rematerialise each resnet and attention layer in the backward pass.
    remat_policy: the jax.checkpoint policy when `remat` (None saves nothing).
    dtype: computation dtype.
    param_dtype: parameter storage dtype.
  """
  num_groups: int = 32
  eps: float = 1e-5
  head_dim: int = 0
  dropout: float = 0.0
  attention_impl: str = "auto"
  attention_chip: str = ""
  remat: bool = False
  remat_policy: Callable | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32


def _resnet(options: BlockOptions, out_channels: int, deterministic: bool, name: str):
  cls = nn.remat(ResnetBlock2D, policy=options.remat_policy) if options.remat else ResnetBlock2D
  return cls(out_channels, options.num_groups, options.eps, options.dropout, deterministic,
             dtype=options.dtype, param_dtype=options.param_dtype, name=name)


def _attention(options: BlockOptions, name: str):
  cls = (nn.remat(SpatialSelfAttention, policy=options.remat_policy) if options.remat
         else SpatialSelfAttention)
  return cls(options.head_dim, options.num_groups, options.eps, options.attention_impl,
             options.attention_chip, dtype=options.dtype, param_dtype=options.param_dtype,
             name=name)


class DownBlock2D(nn.Module):
  """`num_layers` resnets (each followed by attention when `attention`), then a
  stride-2 downsampler unless `add_downsample`.

  Parameters: resnets_{i}, attentions_{i} (with attention), downsamplers_0
  (with a downsampler).

  Attributes:
    out_channels: c of every resnet's output.
    num_layers: resnets (layers_per_block).
    attention: AttnDownBlock2D (True) or DownBlock2D (False).
    add_downsample: end with a Downsample2D (every block but the last).
    downsample_padding: 1 (pad all sides) or 0 (pad bottom and right).
    options: what all the block's layers share.
    deterministic: no dropout.
  """
  out_channels: int
  num_layers: int
  attention: bool
  add_downsample: bool
  downsample_padding: int = 1
  options: BlockOptions = BlockOptions()
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """x [b, H, W, c_in], temb [b, e] -> (output, skips): the output [b, H', W', c]
    (H' = H/2 with a downsampler) and every layer's output, the up blocks' skips."""
    skips = []
    for i in range(self.num_layers):
      x = _resnet(self.options, self.out_channels, self.deterministic, f"resnets_{i}")(x, temb)
      if self.attention:
        x = _attention(self.options, f"attentions_{i}")(x)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.downsample_padding, dtype=self.options.dtype,
                       param_dtype=self.options.param_dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class MidBlock2D(nn.Module):
  """resnet, attention, resnet at the lowest resolution (UNetMidBlock2D, add_attention True).

  Parameters: resnets_0, attentions_0, resnets_1.

  Attributes:
    options: what all the block's layers share.
    deterministic: no dropout.
  """
  options: BlockOptions = BlockOptions()
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    """x [b, H, W, c], temb [b, e] -> [b, H, W, c]."""
    c = x.shape[-1]
    x = _resnet(self.options, c, self.deterministic, "resnets_0")(x, temb)
    x = _attention(self.options, "attentions_0")(x)
    return _resnet(self.options, c, self.deterministic, "resnets_1")(x, temb)


class UpBlock2D(nn.Module):
  """`num_layers` resnets, each on [x | skip] concatenated over channels (skips taken
  from the end) and followed by attention when `attention`; then a nearest x2
  upsampler unless `add_upsample`.

  Parameters: resnets_{i}, attentions_{i} (with attention), upsamplers_0
  (with an upsampler).

  Attributes:
    out_channels: c of every resnet's output.
    num_layers: resnets (layers_per_block + 1).
    attention: AttnUpBlock2D (True) or UpBlock2D (False).
    add_upsample: end with an Upsample2D (every block but the last).
    options: what all the block's layers share.
    deterministic: no dropout.
  """
  out_channels: int
  num_layers: int
  attention: bool
  add_upsample: bool
  options: BlockOptions = BlockOptions()
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array) -> jax.Array:
    """x [b, H, W, c_in], `num_layers` skips [b, H, W, c_i] (the last used first),
    temb [b, e] -> [b, 2H, 2W, c] (or [b, H, W, c] without an upsampler)."""
    if len(skips) != self.num_layers:
      raise ValueError(f"UpBlock2D {self.name!r}: {len(skips)} skips for {self.num_layers} "
                       "resnets.")
    for i, skip in enumerate(reversed(skips)):
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      x = _resnet(self.options, self.out_channels, self.deterministic, f"resnets_{i}")(x, temb)
      if self.attention:
        x = _attention(self.options, f"attentions_{i}")(x)
    if self.add_upsample:
      x = Upsample2D(dtype=self.options.dtype, param_dtype=self.options.param_dtype,
                     name="upsamplers_0")(x)
    return x
