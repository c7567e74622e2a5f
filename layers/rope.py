"""Rotary position embedding in the rotate-half layout used by HF Llama, with frequency scaling.

Dimension i of a head is rotated together with dimension i + d/2 by the angle
position * f_i, where f_i = theta^(-2i/d) for i < d/2 unless a `RopeScaling`
changes the frequencies (to stretch a model past the context it was trained
at):

  linear   f_i / factor (position interpolation).
  dynamic  NTK-aware: theta grows with the row's length n once n exceeds the
           original context c: theta·(factor·n/c − (factor − 1))^(d/(d−2)).
  yarn     per-frequency blend of f_i and f_i / factor by a linear ramp over
           the dimensions that rotate between beta_fast and beta_slow times in
           c tokens; cos and sin are scaled by an attention factor (default
           0.1·ln(factor) + 1).
  llama3   f_i kept for wavelengths below c / high_freq_factor, divided by
           factor above c / low_freq_factor, smoothly interpolated between.

The formulas follow the published methods as transformers implements them
(modeling_rope_utils), so imported checkpoints compute the same angles.

Shapes: b batch, t sequence, h heads, d head dim.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_SCALING_KINDS = ("none", "linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How RoPE frequencies are rescaled (a hashable layer field).

  Attributes:
    kind: one of ROPE_SCALING_KINDS ('none' leaves the frequencies alone).
    factor: context extension factor (linear, dynamic, yarn, llama3).
    original_context: tokens the model was pre-trained at (dynamic, yarn, llama3).
    low_freq_factor, high_freq_factor: llama3's wavelength bounds c/low, c/high.
    beta_fast, beta_slow: yarn's ramp bounds, in rotations over c tokens.
    attention_factor: yarn's cos/sin scale; 0 derives it from factor and mscale.
    mscale, mscale_all_dim: yarn (DeepSeek style): when both are nonzero the
      derived attention factor is m(factor, mscale) / m(factor, mscale_all_dim).
    truncate: yarn rounds the ramp bounds to whole dimensions.
  """
  kind: str = "none"
  factor: float = 1.0
  original_context: int = 0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float = 0.0
  mscale: float = 0.0
  mscale_all_dim: float = 0.0
  truncate: bool = True

  def check(self, prefix: str = "rope_scaling") -> None:
    """Raises ValueError naming `<prefix>.<field>` for a value the kind cannot use."""
    if self.kind not in ROPE_SCALING_KINDS:
      raise ValueError(f"{prefix}.kind={self.kind!r}; choose one of {ROPE_SCALING_KINDS}.")
    if self.kind == "none":
      return
    if self.factor <= 0:
      raise ValueError(f"{prefix}.factor={self.factor} must be positive.")
    if self.kind != "linear" and self.original_context <= 0:
      raise ValueError(f"{prefix}.original_context={self.original_context}: {self.kind!r} "
                       "scaling needs the pre-training context length in tokens.")
    if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(f"{prefix}.high_freq_factor={self.high_freq_factor} must exceed "
                       f"{prefix}.low_freq_factor={self.low_freq_factor}.")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq: np.ndarray, head_dim: int, theta: float, s: RopeScaling):
  """yarn's blended frequencies [d/2] and attention factor."""
  def correction_dim(rotations):
    return (head_dim * math.log(s.original_context / (rotations * 2 * math.pi))
            / (2 * math.log(theta)))
  low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # As transformers does, to avoid dividing by zero.
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolate = (1 - ramp).astype(np.float32)
  inv_freq = (inv_freq / s.factor) * (1 - extrapolate) + inv_freq * extrapolate
  attention_factor = s.attention_factor
  if not attention_factor:
    if s.mscale and s.mscale_all_dim:
      attention_factor = (_yarn_mscale(s.factor, s.mscale)
                          / _yarn_mscale(s.factor, s.mscale_all_dim))
    else:
      attention_factor = _yarn_mscale(s.factor)
  return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
  """Llama 3.1's frequencies [d/2]: long wavelengths divided by factor, short ones kept."""
  low_wavelen = s.original_context / s.low_freq_factor
  high_wavelen = s.original_context / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (s.original_context / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def static_frequencies(head_dim: int, theta: float,
                       scaling: RopeScaling | None = None) -> tuple[np.ndarray, float]:
  """(inverse frequencies float32 [d/2], cos/sin scale) of every kind but 'dynamic'."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
  kind = "none" if scaling is None else scaling.kind
  if kind in ("none", "dynamic"):
    return inv_freq, 1.0
  if kind == "linear":
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32), 1.0
  if kind == "yarn":
    return _yarn(inv_freq, head_dim, theta, scaling)
  if kind == "llama3":
    return _llama3(inv_freq, scaling), 1.0
  raise ValueError(f"Unknown RoPE scaling kind {kind!r}; choose one of {ROPE_SCALING_KINDS}.")


def _dynamic_frequencies(positions: jax.Array, head_dim: int, theta: float,
                         s: RopeScaling) -> jax.Array:
  """Dynamic-NTK frequencies float32 [b, 1, d/2] for each row's length max(position) + 1."""
  length = jnp.max(positions, axis=-1, keepdims=True).astype(jnp.float32) + 1.0  # [b, 1]
  length = jnp.maximum(length, float(s.original_context))
  base = theta * ((s.factor * length / s.original_context) - (s.factor - 1)) ** (
      head_dim / (head_dim - 2))
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (base[..., None] ** exponents)


def rope_angles(positions: jax.Array, head_dim: int, theta: float,
                scaling: RopeScaling | None = None) -> jax.Array:
  """Rotation angles, float32 [b, t, d/2], for integer `positions` [b, t]."""
  if scaling is not None and scaling.kind == "dynamic":
    inv_freq = _dynamic_frequencies(positions, head_dim, theta, scaling)
  else:
    inv_freq = jnp.asarray(static_frequencies(head_dim, theta, scaling)[0])
  return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               scaling: RopeScaling | None = None) -> jax.Array:
  """Rotates x [b, t, h, d] by `positions` [b, t]; computed in float32, returns x.dtype."""
  head_dim = x.shape[-1]
  angles = rope_angles(positions, head_dim, theta, scaling)[:, :, None, :]  # [b, t, 1, d/2]
  magnitude = static_frequencies(head_dim, theta, scaling)[1]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1) * magnitude
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1) * magnitude
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)
