"""A projection written as one einsum, with named kernel axes and an optional bias.

Shapes: b batch, t sequence, h heads, k kv heads, d head dim, e embed, m mlp.
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from layers import cpu_einsum


class Einsum(nn.Module):
  """y = einsum(equation, x, kernel) [+ bias] with a logically partitioned kernel.

  The kernel is initialised with fan-in truncated-normal scaling, where fan-in
  is the product of the first `num_contracting` kernel axes, unless
  `kernel_init` says otherwise. A bias (zeros at
  init) is added when `bias_axes` is set; its shape is the kernel's
  non-contracting axes, which must be the trailing axes of the output, e.g.
  [h, d] for 'bte,ehd->bthd'.

  Attributes:
    shape: kernel shape, contracting axes first, e.g. (e, h, d).
    axes: one logical axis name per kernel axis, e.g. ('embed', 'heads', 'head_dim').
    equation: einsum equation 'input,kernel->output', e.g. 'bte,ehd->bthd'.
    num_contracting: how many leading kernel axes are contracted with the input.
    bias_axes: logical names of the bias axes (the kernel's non-contracting
      axes), e.g. ('heads', 'head_dim'); None (default) means no bias.
    dtype: computation dtype (inputs and kernel are cast to it).
    param_dtype: storage dtype of the kernel and bias.
    kernel_init: initializer (key, shape, dtype) of the kernel; None: fan-in
      truncated normal.
  """
  shape: Sequence[int]
  axes: Sequence[str]
  equation: str
  num_contracting: int = 1
  bias_axes: Sequence[str] | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Callable[..., jax.Array] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the projection; the output shape follows `equation`."""
    rank = len(self.shape)
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal",
        in_axis=tuple(range(self.num_contracting)),
        out_axis=tuple(range(self.num_contracting, rank)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                        tuple(self.shape), self.param_dtype)
    if self.bias_axes is None:
      x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
      return cpu_einsum.einsum(self.equation, x, kernel)
    bias_shape = tuple(self.shape[self.num_contracting:])
    if len(self.bias_axes) != len(bias_shape):
      raise ValueError(f"Einsum {self.name!r}: bias_axes={tuple(self.bias_axes)} must name the "
                       f"{len(bias_shape)} non-contracting kernel axes {bias_shape}.")
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           tuple(self.bias_axes)),
                      bias_shape, self.param_dtype)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = cpu_einsum.einsum(self.equation, x, kernel)
    if y.shape[y.ndim - bias.ndim:] != bias.shape:
      raise ValueError(f"Einsum {self.name!r}: bias shape {bias.shape} is not the trailing "
                       f"axes of the output {y.shape} of {self.equation!r}.")
    return y + bias
