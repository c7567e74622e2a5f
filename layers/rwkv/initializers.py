"""RWKV-7's depth-dependent initialisation, as BlinkDL's RWKV-LM v7 trainer sets it up.

Layer l of L (0-based; l may be a traced value, so scanned blocks each get their
own) gives two ratios: `shallow` = 1 − l/L (1 at the first layer, 1/L at the
last) and `deep` = l/(L−1) (0 at the first layer, 1 at the last; 0 when L = 1).
Channel c of e gives `ramp` = c/e (0 → 1), `centred` = c/(e−1) − ½ (−½ → ½) and,
per head of d channels, `zigzag` = z·|z| with z = (c mod d − (d−1)/2) / ((d−1)/2)
(−1 → 1 within every head, flat near its middle).

  token-shift lerps   μ = 1 − ramp^(p·shallow) with p = 0.2 for r and g, 0.9 for w
                      and a, 0.7 for k and v: the first layer takes much of the
                      previous token on early channels, the last layer almost none.
  channel-mix lerp    μ_k = 1 − ramp^(shallow⁴).
  decay offset w0     −5.5 + 6·(c/(e−1))^(1 + deep^0.3) + 2.5·zigzag: slow decay on
                      early channels, fast on late ones, more slow channels deeper
                      down, and a spread of speeds inside each head.
  in-context rate a0  −0.19 + 0.3·zigzag + 0.4·centred.
  value mix v0        0.73 − 0.4·centred.
  k_k, k_a, r_k       0.71 − 0.1·centred; 1.02; −0.04.
  ln_x scale          ((l + 1)/L)^0.7 (bias 0).
  projections         orthogonal: receptance and value gain 1, key gain 0.1,
                      channel-mix key gain 1; the time mix's output and the
                      channel mix's value start at zero (each block starts as
                      the identity on the residual stream).
  low-rank maps       the first factor zero, the second [R, e] orthogonal with gain
                      0.1 (times √(R/e) if R > e).
  embedding, head     uniform in ±1e-4 (ln0 normalises it); head orthogonal with
                      gain ½·√(v/e) when v > e, else ½.

The trainer's decay exp(−exp(−softplus(−w) − ½)) equals this model's
exp(−e^{−½}·σ(w)), so its w0 carries over unchanged. Orthogonal means
semi-orthogonal over the kernel seen as a [fan-in, fan-out] matrix (the
contracting axes against the rest), as torch's `orthogonal_` on the transposed
Linear weight.

Shapes (layers/__init__.py): e embed, h heads, d head size, v vocab, L layers.
"""

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# (lerp, power p of μ = 1 − ramp^(p·shallow)) of the time mix's six token-shift lerps.
TIME_MIX_LERP_POWERS = (("r", 0.2), ("w", 0.9), ("k", 0.7), ("v", 0.7), ("a", 0.9), ("g", 0.2))
KEY_GAIN = 0.1
EMBED_RANGE = 1e-4


def depth_ratios(depth, num_layers: int) -> tuple[jax.Array, jax.Array]:
  """(shallow = 1 − l/L, deep = l/(L−1)) as float32 scalars; depth may be traced."""
  depth = jnp.asarray(depth, jnp.float32)
  return 1.0 - depth / num_layers, depth / max(num_layers - 1, 1)


def _channel_ramps(e: int, head_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(ramp c/e, centred c/(e−1) − ½, zigzag) over the e channels, float32."""
  c = jnp.arange(e, dtype=jnp.float32)
  half = max(head_size - 1, 1) / 2
  z = (jnp.mod(c, head_size) - (head_size - 1) / 2) / half
  return c / e, c / max(e - 1, 1) - 0.5, z * jnp.abs(z)


def _flat(values: Callable[[int], jax.Array]) -> Initializer:
  """An initializer from channel values over the flattened shape (e or [h, d])."""
  def init(key, shape, dtype=jnp.float32):
    del key
    return values(math.prod(shape)).reshape(shape).astype(dtype)
  return init


def token_shift_lerp(power: float, depth, num_layers: int) -> Initializer:
  """μ[c] = 1 − (c/e)^(power·shallow) over shape [e]."""
  shallow, _ = depth_ratios(depth, num_layers)
  return _flat(lambda e: 1.0 - _channel_ramps(e, 1)[0] ** (power * shallow))


def channel_mix_lerp(depth, num_layers: int) -> Initializer:
  """μ_k[c] = 1 − (c/e)^(shallow⁴) over shape [e]."""
  shallow, _ = depth_ratios(depth, num_layers)
  return _flat(lambda e: 1.0 - _channel_ramps(e, 1)[0] ** (shallow ** 4))


def decay_offset(head_size: int, depth, num_layers: int) -> Initializer:
  """w0[c] = −5.5 + 6·(c/(e−1))^(1 + deep^0.3) + 2.5·zigzag[c] over shape [e]."""
  _, deep = depth_ratios(depth, num_layers)

  def values(e):
    _, centred, zigzag = _channel_ramps(e, head_size)
    return -5.5 + 6.0 * (centred + 0.5) ** (1.0 + deep ** 0.3) + 2.5 * zigzag
  return _flat(values)


def iclr_offset(head_size: int) -> Initializer:
  """a0[c] = −0.19 + 0.3·zigzag[c] + 0.4·centred[c] over shape [e]."""
  def values(e):
    _, centred, zigzag = _channel_ramps(e, head_size)
    return -0.19 + 0.3 * zigzag + 0.4 * centred
  return _flat(values)


def value_mix_offset() -> Initializer:
  """v0[c] = 0.73 − 0.4·centred[c] over shape [e]."""
  return _flat(lambda e: 0.73 - 0.4 * _channel_ramps(e, 1)[1])


def key_norm_scale() -> Initializer:
  """k_k = 0.71 − 0.1·centred over the flattened [h, d] channels."""
  return _flat(lambda e: 0.71 - 0.1 * _channel_ramps(e, 1)[1])


def group_norm_scale(depth, num_layers: int) -> Initializer:
  """ln_x scale ((l + 1)/L)^0.7 everywhere."""
  layer_scale = ((jnp.asarray(depth, jnp.float32) + 1.0) / num_layers) ** 0.7

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, layer_scale, dtype)
  return init


def orthogonal(gain: float, num_contracting: int = 1) -> Initializer:
  """A (semi-)orthogonal [fan-in, fan-out] matrix times `gain`, reshaped to the kernel;
  fan-in is the product of the first `num_contracting` axes."""
  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = math.prod(shape[:num_contracting]), math.prod(shape[num_contracting:])
    return nn.initializers.orthogonal(gain)(key, (fan_in, fan_out), dtype).reshape(shape)
  return init


def low_rank_out_gain(rank: int, embed_dim: int) -> float:
  """0.1, times √(R/e) when R > e."""
  return 0.1 * (math.sqrt(rank / embed_dim) if rank > embed_dim else 1.0)


def head_gain(vocab_size: int, embed_dim: int) -> float:
  """½·√(v/e) when v > e, else ½."""
  return 0.5 * math.sqrt(vocab_size / embed_dim) if vocab_size > embed_dim else 0.5


def small_uniform(key, shape, dtype=jnp.float32) -> jax.Array:
  """Uniform in ±1e-4 (the embedding: ln0 normalises it)."""
  return jax.random.uniform(key, shape, dtype, -EMBED_RANGE, EMBED_RANGE)
