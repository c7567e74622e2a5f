"""A bias-free projection written as one einsum, with named kernel axes.

Shapes: b batch, t sequence, h heads, k kv heads, d head dim, e embed, m mlp.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype


class Einsum(nn.Module):
  """y = einsum(equation, x, kernel) with a logically partitioned kernel.

  The kernel is initialised with fan-in truncated-normal scaling, where fan-in
  is the product of the first `num_contracting` kernel axes.

  Attributes:
    shape: kernel shape, contracting axes first, e.g. (e, h, d).
    axes: one logical axis name per kernel axis, e.g. ('embed', 'heads', 'head_dim').
    equation: einsum equation 'input,kernel->output', e.g. 'bte,ehd->bthd'.
    num_contracting: how many leading kernel axes are contracted with the input.
    dtype: computation dtype (inputs and kernel are cast to it).
    param_dtype: storage dtype of the kernel.
  """
  shape: Sequence[int]
  axes: Sequence[str]
  equation: str
  num_contracting: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the projection; the output shape follows `equation`."""
    rank = len(self.shape)
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal",
        in_axis=tuple(range(self.num_contracting)),
        out_axis=tuple(range(self.num_contracting, rank)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                        tuple(self.shape), self.param_dtype)
    x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
    return jnp.einsum(self.equation, x, kernel)
