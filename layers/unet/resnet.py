"""The UNet's residual block with a timestep shift (diffusers' ResnetBlock2D, 'default' norm).

Shapes: b batch, H height, W width, c channels; e the time-embedding width.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from layers.linear import Einsum
from layers.unet.conv import ACTIVATION_AXES, Conv2D
from layers.unet.group_norm import GroupNorm


class ResnetBlock2D(nn.Module):
  """x + conv2(dropout(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))).

  The shortcut is a 1x1 conv when the channel count changes (c_in != c_out),
  else the identity; the output scale factor is 1.

  Parameters: norm1 (c_in), conv1/kernel [3, 3, c_in, c_out], time_emb_proj/kernel
  [e, c_out], norm2 (c_out), conv2/kernel [3, 3, c_out, c_out], and
  conv_shortcut/kernel [1, 1, c_in, c_out] when c_in != c_out; each with a bias.

  Attributes:
    out_channels: c_out.
    num_groups: GroupNorm groups; divides c_in and c_out.
    eps: GroupNorm epsilon.
    dropout: dropout rate before conv2 (the 'dropout' rng when not deterministic).
    deterministic: no dropout.
    dtype: computation dtype.
    param_dtype: parameter storage dtype.
  """
  out_channels: int
  num_groups: int
  eps: float = 1e-5
  dropout: float = 0.0
  deterministic: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    """x [b, H, W, c_in], temb [b, e] -> [b, H, W, c_out]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c_out = self.out_channels
    h = nn.silu(GroupNorm(self.num_groups, self.eps, name="norm1", **kw)(x))
    h = Conv2D(c_out, name="conv1", **kw)(h)
    shift = Einsum((temb.shape[-1], c_out), ("channels_in", "channels"), "be,ec->bc",
                   bias_axes=("channels",), name="time_emb_proj", **kw)(nn.silu(temb))
    h = h + shift[:, None, None, :]
    h = nn.silu(GroupNorm(self.num_groups, self.eps, name="norm2", **kw)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
    h = Conv2D(c_out, name="conv2", **kw)(h)
    if x.shape[-1] != c_out:
      x = Conv2D(c_out, kernel_size=(1, 1), padding=((0, 0), (0, 0)), name="conv_shortcut",
                 **kw)(x)
    out = nn.with_logical_constraint(x + h, ACTIVATION_AXES)
    return checkpoint_name(out, "resnet_out")
