"""A causal depthwise convolution over time that restarts at document boundaries.

out[t] = bias + Σ_k kernel[k] · x[t - (w-1) + k], counting only inputs of
token t's own document (packed rows) and, when decoding, the window of the
last w-1 inputs carried over from the previous call.

Shapes (layers/__init__.py): b batch, t sequence, w convolution width, and
any trailing channel axes (e.g. [h, d] or [ng, N]).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def causal_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, doc: jax.Array,
                window: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Depthwise causal convolution with document resets.

  Args:
    x: [b, t, ...] inputs.
    kernel: [w, ...] one filter per channel (kernel[w-1] weighs the current token).
    bias: [...] per-channel bias, or None for none.
    doc: int [b, t] document index (layers.ssm.ssd.document_index); the window
      belongs to document 0.
    window: [b, w-1, ...] the previous call's last inputs (zeros where they
      belong to an earlier document), or None for zeros.
  Returns:
    (out [b, t, ...] in x.dtype, the new window [b, w-1, ...]: the last w-1
    inputs, zeroed where they are not in the last token's document).
  """
  b, t = x.shape[:2]
  w = kernel.shape[0]
  channels = x.shape[2:]
  if window is None:
    window = jnp.zeros((b, w - 1) + channels, x.dtype)
  padded = jnp.concatenate([window.astype(x.dtype), x], axis=1)  # [b, w-1+t, ...]
  padded_doc = jnp.concatenate([jnp.zeros((b, w - 1), doc.dtype), doc], axis=1)
  expand = lambda m: m.reshape(m.shape + (1,) * len(channels))  # noqa: E731
  # Products on [b·t, ...]: the kernel's gradient then sums over one leading axis. (XLA:CPU
  # 0.10 sums [1, t, h, d] over t 60x slower than [t, h, d] over its first axis, and the
  # transpose of a [b, t, ...] * [...] product with b = 1 is exactly that reduction.)
  rows = (b * t,) + channels
  out = jnp.zeros(rows, jnp.float32)
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  for k in range(w):
    inputs = padded[:, k:k + t].astype(jnp.float32)
    same = expand(padded_doc[:, k:k + t] == doc)
    out = out + jnp.where(same, inputs, 0.0).reshape(rows) * kernel[k].astype(jnp.float32)
  out = out.reshape(x.shape)
  if w == 1:
    return out.astype(x.dtype), padded[:, :0]
  tail, tail_doc = padded[:, -(w - 1):], padded_doc[:, -(w - 1):]
  new_window = jnp.where(expand(tail_doc == padded_doc[:, -1:]), tail, jnp.zeros_like(tail))
  return out.astype(x.dtype), new_window


class CausalConv(nn.Module):
  """`causal_conv` with its parameters: kernel [w, ...] and bias [...].

  The kernel starts uniform in ±1/sqrt(w) (PyTorch's Conv1d default for a
  depthwise filter), the bias at zero (absent when `use_bias` is False).

  Attributes:
    width: w, the taps of each filter (the current token and w-1 before it).
    axes: logical axis names of the channel axes, e.g. ('heads', 'head_dim').
    use_bias: whether the filter has a bias.
    dtype: dtype of the output.
    param_dtype: storage dtype of kernel and bias.
  """
  width: int
  axes: tuple[str, ...]
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, doc: jax.Array,
               window: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [b, t, ...] -> (out [b, t, ...] in `dtype`, new window [b, w-1, ...])."""
    channels = x.shape[2:]
    bound = 1.0 / self.width ** 0.5
    init = lambda key, shape, dtype: jax.random.uniform(  # noqa: E731
        key, shape, dtype, -bound, bound)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, ("conv_width",) + self.axes),
                        (self.width,) + channels, self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           self.axes),
                      channels, self.param_dtype) if self.use_bias else None
    out, window = causal_conv(x, kernel, bias, doc, window)
    return out.astype(self.dtype), window
