"""A 2-D convolution over NHWC images with explicit padding and logically named axes.

Shapes: b batch, H height, W width, c channels.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

# Kernel axes [kh, kw, c_in, c_out]: spatial taps replicated, input channels over
# fsdp, output channels replicated (configs/base.py). `image_channels` names the
# RGB side of the first and last convs, which no mesh axis divides.
CONV_AXES = ("conv_height", "conv_width", "channels_in", "channels")
# Feature maps [b, H, W, c]: batch over data and fsdp, the rest replicated.
ACTIVATION_AXES = ("batch", "height", "width", "channels")


class Conv2D(nn.Module):
  """y = conv(x, kernel) + bias, kernel HWIO [kh, kw, c_in, c_out], stride `strides`.

  Padding is explicit ((top, bottom), (left, right)): torch's Conv2d(padding=1)
  is ((1, 1), (1, 1)), where Flax's 'SAME' pads a stride-2 conv (0, 1).
  Initialisation: fan-in truncated normal kernel, zero bias.

  Attributes:
    features: output channels c_out.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)) zeros added around each image.
    axes: logical names of the kernel axes (the bias takes the last).
    dtype: computation dtype.
    param_dtype: parameter storage dtype.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
  axes: Sequence[str] = CONV_AXES
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [b, H, W, c_in] -> [b, H', W', c_out] in `dtype`."""
    shape = (*self.kernel_size, x.shape[-1], self.features)
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=(0, 1, 2), out_axis=3)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)), shape,
                        self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           (self.axes[-1],)),
                      (self.features,), self.param_dtype)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=self.strides, padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias
