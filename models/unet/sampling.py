"""Diffusion samplers: inference timesteps, one DDPM or DDIM step, the whole loop, guidance.

Pure JAX (no Flax, no train/): the denoiser is any callable denoise_fn(x_t [b, H, W, c],
t int32 [b]) -> model output [b, H, W, c], so these run from a notebook as well as from training.
The maths follows diffusers' DDPMScheduler and DDIMScheduler (tests check the two step by step);
where we differ, and why:
  * Our steps take `prev_t` explicitly: the next timestep of the inference sequence, −1 after the
    last (ᾱ_prev = 1 there; DDIM's `set_alpha_to_one=False` uses ᾱ_0 instead). diffusers' DDIM
    assumes prev = t − T//N whatever the spacing, which is wrong for 'linspace' (diffusers issues
    #12633, #11347) and for 'trailing' when N does not divide T. For 'leading', and 'trailing' with
    N dividing T, the two coincide and we match diffusers; otherwise we follow the maths.
  * DDPM adds no noise on the final step (prev_t < 0), as in Ho et al.'s Algorithm 2. diffusers adds
    noise whenever t > 0: harmless for 'fixed_small' (its variance is clamped to 1e-20 there), but with
    'fixed_large' or 'learned_range' and a last timestep above 0 (trailing spacing, steps_offset) it
    puts noise of variance up to β_t onto the finished sample.
  * Channels are last: a 'learned_range' output [b, H, W, 2c] splits on the last axis (diffusers:
    axis 1). No dynamic thresholding, and no 'fixed_large_log' (diffusers takes the square root of a
    logarithm there).
  * `sample` draws step i's noise as jax.random.normal(jax.random.split(rng, num_steps)[i],
    x.shape, float32) and takes the starting noise as an argument, so a run can be replayed
    exactly in another framework.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models.unet.schedule import NoiseSchedule, alpha_bar, per_example, predict_x0_and_eps

SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddpm", "ddim")
# 'fixed_small_log' is 'fixed_small' by another route (diffusers takes exp(½·log σ²)).
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")
# diffusers' floor on the DDPM posterior variance (it is 0 on a final step).
MIN_POSTERIOR_VARIANCE = 1e-20

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def inference_timesteps(num_train_timesteps: int, num_steps: int, spacing: str,
                        steps_offset: int = 0) -> np.ndarray:
  """The descending timesteps of an N-step sampler, int32 [num_steps], as diffusers' set_timesteps.

  'leading': k·(T//N) + steps_offset; 'trailing': round(T − k·T/N) − 1 (ends high, at T − 1);
  'linspace': round(linspace(0, T − 1, N)). steps_offset applies to 'leading' only (as diffusers).
  """
  if spacing not in SPACINGS:
    raise ValueError(f"sample.spacing={spacing!r} must be one of {SPACINGS}.")
  if not 1 <= num_steps <= num_train_timesteps:
    raise ValueError(f"sample.num_steps={num_steps} must be in [1, diffusion.num_train_timesteps="
                     f"{num_train_timesteps}].")
  if spacing == "linspace":
    steps = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
  elif spacing == "leading":
    steps = (np.arange(num_steps) * (num_train_timesteps // num_steps))[::-1] + steps_offset
  else:
    ratio = num_train_timesteps / num_steps
    steps = np.round(np.arange(num_train_timesteps, 0, -ratio)) - 1
  steps = steps.astype(np.int64)
  if steps.shape != (num_steps,) or steps.min() < 0 or steps.max() >= num_train_timesteps:
    raise ValueError(f"sample.steps_offset={steps_offset} puts the {spacing!r} timesteps "
                     f"{steps.tolist()} outside [0, {num_train_timesteps}); lower it.")
  return steps.astype(np.int32)


def previous_timesteps(timesteps: np.ndarray) -> np.ndarray:
  """Each step's prev_t: the next entry of the descending `timesteps`, −1 after the last."""
  return np.append(np.asarray(timesteps)[1:], -1).astype(np.int32)


def _alpha_bar_prev(schedule: NoiseSchedule, prev_t: jax.Array, final: jax.Array) -> jax.Array:
  prev_t = jnp.asarray(prev_t)
  return jnp.where(prev_t >= 0, alpha_bar(schedule, jnp.maximum(prev_t, 0)), final)


def _clip(x0: jax.Array, clip_sample: bool, clip_sample_range: float) -> jax.Array:
  return jnp.clip(x0, -clip_sample_range, clip_sample_range) if clip_sample else x0


def ddpm_step(schedule: NoiseSchedule, model_output: jax.Array, t: jax.Array, prev_t: jax.Array,
              x_t: jax.Array, noise: jax.Array | None, *, variance_type: str = "fixed_small",
              clip_sample: bool = True,
              clip_sample_range: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """One ancestral DDPM step: a draw from the posterior q(x_prev | x_t, x̂_0).

  Args:
    schedule: the training NoiseSchedule (its prediction_type reads model_output).
    model_output: [b, H, W, c] the denoiser's output at (x_t, t); [b, H, W, 2c] for
      'learned_range' (the second half the variance interpolation v ∈ [−1, 1]).
    t, prev_t: int32 scalars or [b]; prev_t is the next timestep of the sequence, −1 at the end.
    x_t: [b, H, W, c] the current sample.
    noise: [b, H, W, c] standard normal noise (unused on a final step), or None for the mean.
    variance_type: 'fixed_small' (the posterior variance β̃), 'fixed_small_log' (the same),
      'fixed_large' (β), 'learned_range' (exp of v's mix of log β and log β̃, Nichol & Dhariwal).
    clip_sample, clip_sample_range: clip x̂_0 to ±range before the posterior mean.

  Returns:
    (x_prev, x̂_0), both [b, H, W, c] in x_t's dtype.
  """
  if variance_type not in VARIANCE_TYPES:
    raise ValueError(f"sample.variance_type={variance_type!r} must be one of {VARIANCE_TYPES}.")
  if variance_type == "learned_range":
    channels = x_t.shape[-1]
    if model_output.shape[-1] != 2 * channels:
      raise ValueError(f"sample.variance_type='learned_range' needs a model output of 2·c = "
                       f"{2 * channels} channels (mean and variance), got {model_output.shape}.")
    model_output, variance_mix = model_output[..., :channels], model_output[..., channels:]
  ab_t = alpha_bar(schedule, jnp.asarray(t))
  ab_prev = _alpha_bar_prev(schedule, prev_t, jnp.float32(1.0))
  step_alpha = ab_t / ab_prev
  step_beta = 1.0 - step_alpha
  x0, _ = predict_x0_and_eps(schedule, model_output, x_t, t)
  x0 = _clip(x0, clip_sample, clip_sample_range)
  x0_coeff = jnp.sqrt(ab_prev) * step_beta / (1.0 - ab_t)
  x_t_coeff = jnp.sqrt(step_alpha) * (1.0 - ab_prev) / (1.0 - ab_t)
  x_prev = per_example(x0_coeff, x0) * x0 + per_example(x_t_coeff, x_t) * x_t
  if noise is not None:
    small = jnp.maximum((1.0 - ab_prev) / (1.0 - ab_t) * step_beta, MIN_POSTERIOR_VARIANCE)
    if variance_type == "fixed_large":
      std = per_example(jnp.sqrt(step_beta), x_t)
    elif variance_type == "learned_range":
      fraction = (variance_mix + 1.0) / 2.0
      log_variance = (fraction * per_example(jnp.log(step_beta), x_t)
                      + (1.0 - fraction) * per_example(jnp.log(small), x_t))
      std = jnp.exp(0.5 * log_variance)
    else:
      std = per_example(jnp.sqrt(small), x_t)
    is_last = per_example(jnp.asarray(prev_t) < 0, x_t)
    x_prev = x_prev + jnp.where(is_last, 0.0, std) * noise
  return x_prev.astype(x_t.dtype), x0.astype(x_t.dtype)


def ddim_step(schedule: NoiseSchedule, model_output: jax.Array, t: jax.Array, prev_t: jax.Array,
              x_t: jax.Array, noise: jax.Array | None, *, eta: float = 0.0,
              clip_sample: bool = True, clip_sample_range: float = 1.0,
              set_alpha_to_one: bool = True,
              use_clipped_model_output: bool = False) -> tuple[jax.Array, jax.Array]:
  """One DDIM step (Song et al. 2021, eq. 12) from t to prev_t.

  x_prev = sqrt(ᾱ_prev)·x̂_0 + sqrt(1 − ᾱ_prev − σ²)·ε̂ + σ·noise, with
  σ = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_prev); η = 0 is deterministic, η = 1 DDPM-like.

  Args:
    schedule, model_output, t, prev_t, x_t: as in ddpm_step (no 'learned_range' split here).
    noise: [b, H, W, c] standard normal noise, or None (then η's noise term is left out).
    eta: η, a float in [0, 1].
    clip_sample, clip_sample_range: clip x̂_0 to ±range (ε̂ stays the unclipped one unless
      use_clipped_model_output, which re-derives ε̂ from the clipped x̂_0 as GLIDE does).
    set_alpha_to_one: ᾱ_prev after the last step (prev_t < 0) is 1, else ᾱ_0.

  Returns:
    (x_prev, x̂_0), both [b, H, W, c] in x_t's dtype.
  """
  final = jnp.float32(1.0) if set_alpha_to_one else alpha_bar(schedule, jnp.int32(0))
  ab_t = alpha_bar(schedule, jnp.asarray(t))
  ab_prev = _alpha_bar_prev(schedule, prev_t, final)
  x0, eps = predict_x0_and_eps(schedule, model_output, x_t, t)
  x0 = _clip(x0, clip_sample, clip_sample_range)
  if use_clipped_model_output:
    eps = (x_t - per_example(jnp.sqrt(ab_t), x_t) * x0) / per_example(jnp.sqrt(1.0 - ab_t), x_t)
  variance = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
  std = eta * jnp.sqrt(variance)
  direction = jnp.sqrt(jnp.maximum(1.0 - ab_prev - std ** 2, 0.0))
  x_prev = per_example(jnp.sqrt(ab_prev), x0) * x0 + per_example(direction, eps) * eps
  if noise is not None:
    x_prev = x_prev + per_example(std, noise) * noise
  return x_prev.astype(x_t.dtype), x0.astype(x_t.dtype)


def sample(denoise_fn: DenoiseFn, schedule: NoiseSchedule, initial_noise: jax.Array,
           rng: jax.Array, *, sampler: str = "ddpm", num_steps: int, spacing: str = "leading",
           steps_offset: int = 0, eta: float = 0.0, clip_sample: bool = True,
           clip_sample_range: float = 1.0, variance_type: str = "fixed_small",
           set_alpha_to_one: bool = True, return_trajectory: bool = False,
           keep_every: int = 1) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Runs the whole reverse chain from `initial_noise` to a sample, under one lax.scan.

  jit-friendly: every keyword is static (jit with them bound, e.g. functools.partial).

  Args:
    denoise_fn: (x_t [b, H, W, c], t int32 [b]) -> model output (see ddpm_step for its layout).
    schedule: the training NoiseSchedule.
    initial_noise: [b, H, W, c] x_T, standard normal.
    rng: key for the per-step noise (step i uses split(rng, num_steps)[i]); unused by DDIM with
      eta = 0.
    sampler: 'ddpm' (ancestral; takes variance_type) or 'ddim' (takes eta, set_alpha_to_one).
    num_steps, spacing, steps_offset: the inference timesteps (see inference_timesteps).
    clip_sample, clip_sample_range: clip x̂_0 at every step.
    return_trajectory: also return x after steps keep_every, 2·keep_every, …, and the last.
    keep_every: the stride of the trajectory.

  Returns:
    x_0 [b, H, W, c] (float32 or initial_noise's wider dtype), and with return_trajectory the
    trajectory [ceil(num_steps / keep_every), b, H, W, c].
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sample.sampler={sampler!r} must be one of {SAMPLERS}.")
  if sampler == "ddpm" and variance_type not in VARIANCE_TYPES:
    raise ValueError(f"sample.variance_type={variance_type!r} must be one of {VARIANCE_TYPES}.")
  if sampler == "ddim" and isinstance(eta, (int, float)) and not 0.0 <= eta <= 1.0:
    raise ValueError(f"sample.eta={eta} must be in [0, 1] (0: deterministic DDIM).")
  if keep_every < 1:
    raise ValueError(f"sample.keep_every={keep_every} must be >= 1.")
  timesteps = inference_timesteps(schedule.num_train_timesteps, num_steps, spacing, steps_offset)
  prev_timesteps = previous_timesteps(timesteps)
  stochastic = sampler == "ddpm" or not (isinstance(eta, (int, float)) and eta == 0)
  x = initial_noise.astype(jnp.promote_types(initial_noise.dtype, jnp.float32))
  batch = x.shape[0]
  num_kept = math.ceil(num_steps / keep_every)
  trajectory = jnp.zeros((num_kept,) + x.shape, x.dtype) if return_trajectory else None

  def step(carry, inputs):
    x, trajectory = carry
    index, t, prev_t, key = inputs
    model_output = denoise_fn(x, jnp.full((batch,), t, jnp.int32))
    noise = jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype) if stochastic else None
    if sampler == "ddpm":
      x_prev, _ = ddpm_step(schedule, model_output, t, prev_t, x, noise,
                            variance_type=variance_type, clip_sample=clip_sample,
                            clip_sample_range=clip_sample_range)
    else:
      x_prev, _ = ddim_step(schedule, model_output, t, prev_t, x, noise, eta=eta,
                            clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                            set_alpha_to_one=set_alpha_to_one)
    if trajectory is not None:
      slot = index // keep_every
      keep = ((index + 1) % keep_every == 0) | (index == num_steps - 1)
      kept = jax.lax.dynamic_index_in_dim(trajectory, slot, keepdims=False)
      trajectory = jax.lax.dynamic_update_index_in_dim(
          trajectory, jnp.where(keep, x_prev, kept), slot, 0)
    return (x_prev, trajectory), None

  inputs = (jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(timesteps),
            jnp.asarray(prev_timesteps), jax.random.split(rng, num_steps))
  (x, trajectory), _ = jax.lax.scan(step, (x, trajectory), inputs)
  return (x, trajectory) if return_trajectory else x


def guided_denoiser(apply_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                    labels: jax.Array, null_label: int, guidance_scale: float) -> DenoiseFn:
  """Classifier-free guidance (Ho & Salimans 2022) around a class-conditional denoiser.

  Args:
    apply_fn: (x [b, H, W, c], t int32 [b], labels int32 [b]) -> model output.
    labels: int32 [b], the classes to sample.
    null_label: the label the model was trained with for "no class" (label dropout).
    guidance_scale: s, a Python float: out = uncond + s·(cond − uncond). s = 1 runs the
      conditional model alone and s = 0 the unconditional one (batch b); any other s runs both
      as one batch of 2b, [cond; uncond]. Every output channel is mixed (split a
      'learned_range' variance half off first if it should stay unguided).

  Returns:
    denoise_fn(x, t) for `sample`.
  """
  labels = jnp.asarray(labels, jnp.int32)
  null_labels = jnp.full_like(labels, null_label)
  scale = float(guidance_scale)
  if scale == 1.0:
    return lambda x, t: apply_fn(x, t, labels)
  if scale == 0.0:
    return lambda x, t: apply_fn(x, t, null_labels)

  def denoise(x, t):
    both = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    jnp.concatenate([labels, null_labels]))
    cond, uncond = jnp.split(both, 2, axis=0)
    return uncond + scale * (cond - uncond)
  return denoise
