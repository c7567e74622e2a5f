"""Self-attention over the positions of a feature map (diffusers' `Attention` in UNet blocks).

Shapes: b batch, H height, W width, c channels, t = H·W positions, h heads,
d head dim (h·d = c).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from layers.attention import implementations
from layers.linear import Einsum
from layers.unet.conv import ACTIVATION_AXES
from layers.unet.group_norm import GroupNorm

_HEAD_AXES = ("batch", None, None, None)  # q, k, v, out [b, t, h, d]: batch-parallel


class SpatialSelfAttention(nn.Module):
  """x + to_out(attention(to_q(n), to_k(n), to_v(n))), n = group_norm(x), non-causal.

  Every position attends every position of its image; the H·W positions form
  the sequence axis of the attention switch (layers/attention/implementations.py).
  The residual is added unscaled (rescale_output_factor 1).

  Parameters: group_norm (c); to_q, to_k, to_v, to_out_0: kernel [c, c] and bias [c].

  Attributes:
    head_dim: channels per head d; 0 means one head of all c channels.
    num_groups: GroupNorm groups.
    eps: GroupNorm epsilon.
    attention_impl: 'auto' | 'xla' | 'cudnn' | 'pallas' ('auto' picks per backend).
    attention_chip: the Pallas kernel's target chip ('' = this machine's).
    dtype: computation dtype.
    param_dtype: parameter storage dtype.
  """
  head_dim: int
  num_groups: int
  eps: float = 1e-5
  attention_impl: str = "auto"
  attention_chip: str = ""
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [b, H, W, c] -> [b, H, W, c]."""
    b, height, width, c = x.shape
    d = self.head_dim or c
    if c % d:
      raise ValueError(f"SpatialSelfAttention {self.name!r}: head_dim={d} does not divide "
                       f"{c} channels.")
    h = c // d
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    normed = GroupNorm(self.num_groups, self.eps, name="group_norm", **kw)(x)
    tokens = normed.reshape(b, height * width, c)

    def project(name, y):
      return Einsum((c, c), ("channels_in", "channels"), "btc,cf->btf", bias_axes=("channels",),
                    name=name, **kw)(y)

    q, k, v = (project(name, tokens).reshape(b, height * width, h, d)
               for name in ("to_q", "to_k", "to_v"))
    q, k, v = (nn.with_logical_constraint(y, _HEAD_AXES) for y in (q, k, v))
    impl = implementations.resolve_impl(self.attention_impl,
                                        backend=implementations.default_backend(),
                                        dtype=self.dtype, head_dim=d)
    out = implementations.dot_product_attention(
        q, k, v, impl=impl, causal=False, interpret=jax.default_backend() == "cpu",
        chip=self.attention_chip)
    out = checkpoint_name(nn.with_logical_constraint(out, _HEAD_AXES), "attention")
    out = project("to_out_0", out.reshape(b, height * width, c))
    return nn.with_logical_constraint(x + out.reshape(x.shape), ACTIVATION_AXES)
