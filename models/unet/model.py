"""The diffusion UNet (diffusers `UNet2DModel` family) as a Flax Linen module.

Shapes (layers/__init__.py): b batch, H height, W width, c channels.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.unet import (BlockOptions, Conv2D, DownBlock2D, GroupNorm, MidBlock2D,
                         TimestepEmbedding, UpBlock2D, sinusoidal_embedding)
from layers.unet.conv import ACTIVATION_AXES, CONV_AXES
from models.llama.config import REMAT_POLICIES
from models.unet.config import UNetConfig


def block_options(config: UNetConfig) -> BlockOptions:
  """The per-layer settings the config gives every resnet and attention layer."""
  return BlockOptions(
      num_groups=config.norm_num_groups, eps=config.norm_eps,
      head_dim=config.attention_head_dim, dropout=config.dropout,
      attention_impl=config.attention_impl, attention_chip=config.attention_chip,
      remat=config.remat_policy != "none", remat_policy=REMAT_POLICIES[config.remat_policy],
      dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


class UNet(nn.Module):
  """Predicts the noise (or whatever it is trained on) of noisy images at given timesteps.

  Parameters (diffusers' names, '.i' written '_i'): conv_in, time_embedding
  (linear_1, linear_2), class_embedding/embedding [num_class_embeds, 4·c0]
  when class-conditional, down_blocks_{i}, mid_block, up_blocks_{i},
  conv_norm_out, conv_out.

  Attributes:
    config: the model shape.
  """
  config: UNetConfig

  @nn.compact
  def __call__(self, images: jax.Array, timesteps: jax.Array, labels: jax.Array | None = None,
               *, deterministic: bool = True) -> jax.Array:
    """images [b, H, W, in_channels], timesteps [b] -> float32 [b, H, W, out_channels].

    Args:
      images: float NHWC images (noisy samples).
      timesteps: int or float [b] (or a scalar, broadcast over the batch).
      labels: int [b] class ids in [0, num_class_embeds); required iff the model
        is class-conditional (num_class_embeds > 0).
      deterministic: False applies dropout with the 'dropout' rng.
    """
    cfg = self.config
    options = block_options(cfg)
    kw = dict(dtype=options.dtype, param_dtype=options.param_dtype)
    c = cfg.block_out_channels
    b = images.shape[0]
    self._check_inputs(images, labels)

    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    features = sinusoidal_embedding(timesteps, c[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                    freq_shift=cfg.freq_shift)
    temb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(features)
    if cfg.num_class_embeds:
      table = self.param(
          "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                          ("classes", "channels")),
          (cfg.num_class_embeds, cfg.time_embed_dim), options.param_dtype)
      temb = temb + jnp.take(table, labels, axis=0).astype(temb.dtype)
    temb = nn.with_logical_constraint(temb, ("batch", "channels"))

    image_in_axes = ("conv_height", "conv_width", "image_channels", "channels")
    x = Conv2D(c[0], axes=image_in_axes, name="conv_in", **kw)(images.astype(options.dtype))
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    skips = [x]
    last = len(c) - 1
    for i, kind in enumerate(cfg.down_block_types):
      x, block_skips = DownBlock2D(
          c[i], cfg.layers_per_block, kind == "AttnDownBlock2D", add_downsample=i < last,
          downsample_padding=cfg.downsample_padding, options=options,
          deterministic=deterministic, name=f"down_blocks_{i}")(x, temb)
      skips.extend(block_skips)
    x = MidBlock2D(options, deterministic, name="mid_block")(x, temb)
    for i, kind in enumerate(cfg.up_block_types):
      count = cfg.layers_per_block + 1
      block_skips, skips = skips[-count:], skips[:-count]
      x = UpBlock2D(c[last - i], count, kind == "AttnUpBlock2D", add_upsample=i < last,
                    options=options, deterministic=deterministic,
                    name=f"up_blocks_{i}")(x, block_skips, temb)
    x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
    image_out_axes = CONV_AXES[:3] + ("image_channels",)
    x = Conv2D(cfg.out_channels, axes=image_out_axes, name="conv_out", **kw)(x)
    return nn.with_logical_constraint(x.astype(jnp.float32), ACTIVATION_AXES)

  def _check_inputs(self, images: jax.Array, labels: jax.Array | None) -> None:
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
      raise ValueError(f"UNet images have shape {images.shape}; expected [batch, height, width, "
                       f"{cfg.in_channels}] (NHWC, model.in_channels={cfg.in_channels}).")
    size = images.shape[1:3]
    if size[0] % cfg.downsampling_factor or size[1] % cfg.downsampling_factor:
      raise ValueError(f"UNet images are {size[0]}x{size[1]}; height and width must be "
                       f"multiples of {cfg.downsampling_factor} (2 ** the downsamplings of "
                       "model.block_out_channels).")
    if cfg.num_class_embeds and labels is None:
      raise ValueError(f"model.num_class_embeds={cfg.num_class_embeds}: this UNet is "
                       "class-conditional; pass labels (int [batch]).")
    if not cfg.num_class_embeds and labels is not None:
      raise ValueError("labels were given but model.num_class_embeds=0 (unconditional); set "
                       "model.num_class_embeds to the number of classes, or pass labels=None.")
