"""Diffusion noise schedules and the training-side maths: noising, targets, SNR and loss weights.

Pure JAX (no Flax, no train/), jit-able; `t` is int32 [b] (a scalar also works) and images are
[b, H, W, c] (any [b, ...] works: per-example coefficients broadcast over the trailing axes).

The betas and ᾱ (`alphas_cumprod`) reproduce diffusers' DDPMScheduler / DDIMScheduler for the
'linear', 'scaled_linear' and 'cosine' (diffusers: 'squaredcos_cap_v2') schedules. Where we differ
from diffusers, and why:
  * diffusers takes the cumulative product of the float32 alphas in float32; we take it in float64
    from the same float32 betas and store float32. The two agree to ~1e-6 relative; ours is the
    exact product of the stored betas (diffusers' float32 product drifts by about that much).
  * `loss_weight` (min-SNR-γ, Hang et al. 2023) is not in diffusers' schedulers (its training
    scripts compute it inline, with the same formulas).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
# diffusers' names for our schedules.
BETA_SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# The cosine schedule (Nichol & Dhariwal 2021) caps β to keep the last steps invertible.
COSINE_MAX_BETA = 0.999
COSINE_OFFSET = 0.008


@functools.partial(jax.tree_util.register_dataclass, data_fields=["betas", "alphas_cumprod"],
                   meta_fields=["num_train_timesteps", "prediction_type"])
@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
  """A discrete variance-preserving diffusion: x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε.

  A pytree: the arrays are leaves (pass the schedule into jitted functions as an argument or close
  over it), the ints and strings static.

  Attributes:
    betas: float32 [num_train_timesteps], β_t for t = 0 … num_train_timesteps − 1.
    alphas_cumprod: float32 [num_train_timesteps], ᾱ_t = Π_{s<=t} (1 − β_s).
    num_train_timesteps: the number of training timesteps.
    prediction_type: what the denoiser predicts: 'epsilon' (the noise ε), 'v_prediction'
      (v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x_0) or 'sample' (x_0 itself).
  """
  betas: np.ndarray | jax.Array
  alphas_cumprod: np.ndarray | jax.Array
  num_train_timesteps: int
  prediction_type: str


def canonical_beta_schedule(beta_schedule: str) -> str:
  """Our name of a beta schedule ('squaredcos_cap_v2' -> 'cosine'); ValueError if unknown."""
  name = BETA_SCHEDULE_ALIASES.get(beta_schedule, beta_schedule)
  if name not in BETA_SCHEDULES:
    raise ValueError(f"diffusion.beta_schedule={beta_schedule!r} must be one of "
                     f"{BETA_SCHEDULES} (or diffusers' alias 'squaredcos_cap_v2' for 'cosine').")
  return name


def check_prediction_type(prediction_type: str) -> None:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"diffusion.prediction_type={prediction_type!r} must be one of "
                     f"{PREDICTION_TYPES}.")


def _cosine_alpha_bar(fraction: float) -> float:
  return math.cos((fraction + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2


def betas_float64(beta_schedule: str, num_train_timesteps: int, beta_start: float,
                  beta_end: float) -> np.ndarray:
  """β_t in float64 [num_train_timesteps], as diffusers defines each schedule."""
  name = canonical_beta_schedule(beta_schedule)
  steps = num_train_timesteps
  if name == "linear":
    return np.linspace(beta_start, beta_end, steps, dtype=np.float64)
  if name == "scaled_linear":  # Latent diffusion: linear in sqrt(β).
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=np.float64) ** 2
  # cosine: β_t = 1 − ᾱ((t + 1)/T) / ᾱ(t/T), capped (beta_start and beta_end are unused).
  return np.array([min(1.0 - _cosine_alpha_bar((i + 1) / steps) / _cosine_alpha_bar(i / steps),
                       COSINE_MAX_BETA) for i in range(steps)], dtype=np.float64)


def make_schedule(beta_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, prediction_type: str = "epsilon") -> NoiseSchedule:
  """The NoiseSchedule of a named beta schedule (float32 numpy arrays).

  Args:
    beta_schedule: 'linear' | 'scaled_linear' | 'cosine' (alias 'squaredcos_cap_v2').
    num_train_timesteps: T, the number of training timesteps.
    beta_start, beta_end: β_0 and β_{T−1} of the linear schedules (the cosine one ignores them).
    prediction_type: 'epsilon' | 'v_prediction' | 'sample'.
  """
  name = canonical_beta_schedule(beta_schedule)
  check_prediction_type(prediction_type)
  if isinstance(num_train_timesteps, bool) or int(num_train_timesteps) != num_train_timesteps \
      or num_train_timesteps < 2:
    raise ValueError(f"diffusion.num_train_timesteps={num_train_timesteps} must be an integer "
                     ">= 2.")
  if name != "cosine" and not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(f"diffusion.beta_start={beta_start} and diffusion.beta_end={beta_end} must "
                     "satisfy 0 < beta_start <= beta_end < 1.")
  betas = betas_float64(name, int(num_train_timesteps), beta_start, beta_end).astype(np.float32)
  alphas_cumprod = np.cumprod(1.0 - betas.astype(np.float64)).astype(np.float32)
  return NoiseSchedule(betas=betas, alphas_cumprod=alphas_cumprod,
                       num_train_timesteps=int(num_train_timesteps),
                       prediction_type=prediction_type)


def per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """`values` [b] (or a scalar) shaped to broadcast against `like` [b, ...]."""
  values = jnp.asarray(values)
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def alpha_bar(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
  """ᾱ_t, float32 with the shape of `t`."""
  return jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t]


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array,
              t: jax.Array) -> jax.Array:
  """q(x_t | x_0): sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise, [b, H, W, c] in x0's dtype."""
  ab = per_example(alpha_bar(schedule, t), x0)
  return (jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise).astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array,
                    t: jax.Array) -> jax.Array:
  """What the denoiser should output at x_t = add_noise(x0, noise, t), [b, H, W, c]:
  noise ('epsilon'), v = sqrt(ᾱ)·noise − sqrt(1 − ᾱ)·x0 ('v_prediction') or x0 ('sample')."""
  if schedule.prediction_type == "epsilon":
    return noise
  if schedule.prediction_type == "sample":
    return x0
  check_prediction_type(schedule.prediction_type)
  ab = per_example(alpha_bar(schedule, t), x0)
  return (jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0).astype(x0.dtype)


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), float32 with the shape of `t`."""
  ab = alpha_bar(schedule, t)
  return ab / (1.0 - ab)


def loss_weight(schedule: NoiseSchedule, t: jax.Array, min_snr_gamma: float) -> jax.Array:
  """Min-SNR-γ weights (Hang et al. 2023) of the per-example MSE to `training_target`, float32 [b].

  Each equals min(SNR, γ) on the x0 error: min(SNR, γ)/SNR for 'epsilon', min(SNR, γ)/(SNR + 1)
  for 'v_prediction', min(SNR, γ) for 'sample'. min_snr_gamma, a Python float: 0 turns the
  weighting off (all ones); the paper uses 5.
  """
  if not min_snr_gamma >= 0:
    raise ValueError(f"diffusion.min_snr_gamma={min_snr_gamma} must be >= 0 (0 turns the "
                     "weighting off; the paper uses 5).")
  check_prediction_type(schedule.prediction_type)
  ratio = snr(schedule, t)
  if min_snr_gamma == 0:
    return jnp.ones_like(ratio)
  clipped = jnp.minimum(ratio, jnp.float32(min_snr_gamma))
  if schedule.prediction_type == "epsilon":
    return clipped / ratio
  if schedule.prediction_type == "v_prediction":
    return clipped / (ratio + 1.0)
  return clipped


def predict_x0_and_eps(schedule: NoiseSchedule, model_output: jax.Array, x_t: jax.Array,
                       t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x̂_0, ε̂), both [b, H, W, c] in float32 (or wider), from the denoiser's output at (x_t, t).

  No clipping here: the samplers clip x̂_0 themselves (and, like diffusers, keep the unclipped ε̂).
  """
  dtype = jnp.promote_types(jnp.result_type(model_output, x_t), jnp.float32)
  model_output, x_t = model_output.astype(dtype), x_t.astype(dtype)
  ab = per_example(alpha_bar(schedule, t), x_t)
  sqrt_ab, sqrt_one_minus_ab = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
  if schedule.prediction_type == "epsilon":
    eps = model_output
    x0 = (x_t - sqrt_one_minus_ab * eps) / sqrt_ab
  elif schedule.prediction_type == "v_prediction":
    x0 = sqrt_ab * x_t - sqrt_one_minus_ab * model_output
    eps = sqrt_ab * model_output + sqrt_one_minus_ab * x_t
  else:
    check_prediction_type(schedule.prediction_type)
    x0 = model_output
    eps = (x_t - sqrt_ab * x0) / sqrt_one_minus_ab
  return x0, eps
