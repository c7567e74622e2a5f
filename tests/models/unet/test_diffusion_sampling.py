"""models/unet/sampling.py against diffusers' DDPMScheduler / DDIMScheduler (torch, CPU, float32).

The steps are elementwise, so arrays go to diffusers in our [b, H, W, c] layout unchanged (except
'learned_range', which diffusers splits on axis 1). Inputs are realistic: x_t = add_noise(x0, ε, t)
with x0 a little outside [−1, 1] (so clipping acts) and the model output the true target plus noise.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.unet import sampling
from models.unet import schedule as schedule_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

T = 1000
SHAPE = (2, 4, 5, 3)
PREDICTIONS = ("epsilon", "v_prediction", "sample")
# The steps run eagerly here (fewer compilations); `sample` runs them jitted under scan.
ddpm_step, ddim_step = sampling.ddpm_step, sampling.ddim_step


def diffusers_scheduler(kind: str, spacing: str, num_steps: int, **kw):
  scheduler = getattr(diffusers, kind)(num_train_timesteps=T, timestep_spacing=spacing, **kw)
  scheduler.set_timesteps(num_steps)
  return scheduler


def step_inputs(sched, t: int, seed: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
  """(x_t, model output) at timestep t: a noised x0 and the true target plus 0.1·noise."""
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1.3, 1.3, shape).astype(np.float32)
  eps = rng.standard_normal(shape).astype(np.float32)
  t_batch = np.full(shape[0], t, np.int32)
  x_t = np.array(schedule_lib.add_noise(sched, x0, eps, t_batch))
  target = np.array(schedule_lib.training_target(sched, x0, eps, t_batch))
  return x_t, (target + 0.1 * rng.standard_normal(shape)).astype(np.float32)


def x0_atol(sched, t: int) -> float:
  """ε → x̂_0 = (x_t − sqrt(1 − ᾱ)·ε)/sqrt(ᾱ) magnifies float32 rounding by 1/sqrt(ᾱ_t)
  (156 at t = 999 of the linear schedule)."""
  return 1e-5 + 2e-7 / float(np.sqrt(sched.alphas_cumprod[t]))


def as_torch(*arrays):
  return [torch.from_numpy(np.array(a)) for a in arrays]


@pytest.mark.parametrize("spacing", sampling.SPACINGS)
@pytest.mark.parametrize("num_train,num_steps,offset", [
    (1000, 10, 0), (1000, 10, 1), (1000, 3, 0), (1000, 7, 1), (1000, 1000, 0), (50, 20, 2)])
def test_inference_timesteps_match_diffusers(spacing, num_train, num_steps, offset):
  ours = sampling.inference_timesteps(num_train, num_steps, spacing, offset)
  assert ours.dtype == np.int32 and (np.diff(ours) < 0).all()
  for kind in ("DDIMScheduler", "DDPMScheduler"):
    reference = getattr(diffusers, kind)(num_train_timesteps=num_train, timestep_spacing=spacing,
                                         steps_offset=offset)
    reference.set_timesteps(num_steps)
    np.testing.assert_array_equal(ours, reference.timesteps.numpy(), err_msg=kind)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_diffusers(prediction_type, clip, variance_type):
  reference = diffusers_scheduler("DDPMScheduler", "leading", 10, prediction_type=prediction_type,
                                  clip_sample=clip, variance_type=variance_type)
  sched = schedule_lib.make_schedule("linear", prediction_type=prediction_type)
  timesteps = sampling.inference_timesteps(T, 10, "leading")
  for t, prev_t in list(zip(timesteps, sampling.previous_timesteps(timesteps)))[::3]:
    x_t, model_output = step_inputs(sched, t, seed=int(t))
    # diffusers draws the variance noise with randn_tensor(model_output.shape, generator).
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(t)))
    expected = reference.step(*as_torch(model_output), int(t), *as_torch(x_t),
                              generator=torch.Generator().manual_seed(int(t)))
    x_prev, x0 = ddpm_step(sched, model_output, t, prev_t, x_t, noise.numpy(),
                           variance_type=variance_type, clip_sample=clip)
    np.testing.assert_allclose(x0, expected.pred_original_sample.numpy(), rtol=1e-5,
                               atol=x0_atol(sched, t))
    np.testing.assert_allclose(x_prev, expected.prev_sample.numpy(), rtol=1e-5, atol=1e-5)


def test_ddpm_learned_range_matches_diffusers():
  reference = diffusers_scheduler("DDPMScheduler", "leading", 20, variance_type="learned_range")
  sched = schedule_lib.make_schedule("linear")
  t, prev_t = 650, 600
  x_t, mean_output = step_inputs(sched, t, seed=1)
  mix = np.tanh(np.random.default_rng(2).standard_normal(SHAPE)).astype(np.float32)
  model_output = np.concatenate([mean_output, mix], axis=-1)  # [b, H, W, 2c]
  to_nchw, to_nhwc = (0, 3, 1, 2), (0, 2, 3, 1)
  noise_nchw = torch.randn((2, 3, 4, 5), generator=torch.Generator().manual_seed(3))
  expected = reference.step(*as_torch(model_output.transpose(to_nchw)), t,
                            *as_torch(x_t.transpose(to_nchw)),
                            generator=torch.Generator().manual_seed(3))
  x_prev, _ = ddpm_step(sched, model_output, t, prev_t, x_t, noise_nchw.numpy().transpose(to_nhwc),
                        variance_type="learned_range")
  np.testing.assert_allclose(x_prev, expected.prev_sample.numpy().transpose(to_nhwc),
                             rtol=1e-5, atol=1e-5)


def test_ddpm_final_step_adds_no_noise():
  """Trailing spacing ends at t = 99: diffusers still adds noise of variance β = 1 − ᾱ_99
  (fixed_large) to the finished sample there; ours returns the posterior mean, x̂_0 itself."""
  reference = diffusers_scheduler("DDPMScheduler", "trailing", 10, variance_type="fixed_large")
  sched = schedule_lib.make_schedule("linear")
  x_t, model_output = step_inputs(sched, 99, seed=4)
  noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
  x_prev, x0 = ddpm_step(sched, model_output, 99, -1, x_t, noise.numpy(),
                         variance_type="fixed_large")
  np.testing.assert_allclose(x_prev, x0, atol=1e-6)
  theirs = reference.step(*as_torch(model_output), 99, *as_torch(x_t),
                          generator=torch.Generator().manual_seed(6))
  np.testing.assert_allclose(theirs.pred_original_sample.numpy(), x0, atol=1e-5)
  added = theirs.prev_sample.numpy() - theirs.pred_original_sample.numpy()
  np.testing.assert_allclose(added, np.sqrt(1 - sched.alphas_cumprod[99]) * noise.numpy(),
                             atol=1e-5)


DDIM_CASES = [(p, spacing, eta, True, True, False) for p in PREDICTIONS
              for spacing in ("leading", "trailing") for eta in (0.0, 0.5)] + [
                  ("epsilon", "leading", 0.5, False, False, False),
                  ("v_prediction", "trailing", 1.0, True, False, True)]


@pytest.mark.parametrize("prediction_type,spacing,eta,clip,alpha_to_one,clipped_eps", DDIM_CASES)
def test_ddim_step_matches_diffusers(prediction_type, spacing, eta, clip, alpha_to_one,
                                     clipped_eps):
  reference = diffusers_scheduler("DDIMScheduler", spacing, 10, prediction_type=prediction_type,
                                  clip_sample=clip, set_alpha_to_one=alpha_to_one)
  sched = schedule_lib.make_schedule("linear", prediction_type=prediction_type)
  timesteps = sampling.inference_timesteps(T, 10, spacing)
  np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())
  for t, prev_t in zip(timesteps, sampling.previous_timesteps(timesteps)):
    x_t, model_output = step_inputs(sched, t, seed=int(t))
    noise = np.random.default_rng(int(t) + 1).standard_normal(SHAPE).astype(np.float32)
    expected = reference.step(*as_torch(model_output), int(t), *as_torch(x_t), eta=eta,
                              use_clipped_model_output=clipped_eps,
                              variance_noise=torch.from_numpy(noise) if eta else None)
    x_prev, x0 = ddim_step(sched, model_output, t, prev_t, x_t, noise, eta=eta, clip_sample=clip,
                           set_alpha_to_one=alpha_to_one, use_clipped_model_output=clipped_eps)
    np.testing.assert_allclose(x0, expected.pred_original_sample.numpy(), rtol=1e-5,
                               atol=x0_atol(sched, t), err_msg=f"t={t}")
    np.testing.assert_allclose(x_prev, expected.prev_sample.numpy(), rtol=1e-5, atol=1e-5,
                               err_msg=f"t={t}")


def test_ddim_linspace_uses_the_true_previous_timestep():
  """diffusers #12633/#11347: its DDIM steps 888 -> 788 where the sequence goes 888 -> 777."""
  reference = diffusers_scheduler("DDIMScheduler", "linspace", 10, clip_sample=False)
  sched = schedule_lib.make_schedule("linear")
  timesteps = sampling.inference_timesteps(T, 10, "linspace")
  prev_timesteps = sampling.previous_timesteps(timesteps)
  t, prev_t, theirs_prev_t = 888, 777, 888 - T // 10
  assert (timesteps[1], prev_timesteps[1]) == (t, prev_t)
  x_t, model_output = step_inputs(sched, t, seed=7)
  noise = np.random.default_rng(8).standard_normal(SHAPE).astype(np.float32)
  eta = 0.5
  theirs = reference.step(*as_torch(model_output), t, *as_torch(x_t), eta=eta,
                          variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
  step = functools.partial(ddim_step, sched, model_output, t, x_t=x_t, noise=noise, eta=eta,
                           clip_sample=False)
  # diffusers is our step evaluated at its (wrong) previous timestep ...
  np.testing.assert_allclose(step(prev_t=theirs_prev_t)[0], theirs, rtol=1e-5, atol=1e-5)
  # ... and ours is the DDIM formula, in float64, at the true one.
  alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
  ab_t, ab_prev = alpha_bar[t], alpha_bar[prev_t]
  x_t64, eps = x_t.astype(np.float64), model_output.astype(np.float64)
  x0 = (x_t64 - np.sqrt(1 - ab_t) * eps) / np.sqrt(ab_t)
  sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab_t)) * np.sqrt(1 - ab_t / ab_prev)
  direct = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma ** 2) * eps + sigma * noise
  ours = np.asarray(step(prev_t=prev_t)[0])
  np.testing.assert_allclose(ours, direct, rtol=1e-5, atol=1e-5)
  assert np.abs(ours - theirs).max() > 1e-2


def linear_denoiser(x, t):
  """A fixed 'model' both frameworks can run: linear in x, shifted by t."""
  return 0.6 * x + 2e-4 * t.reshape((-1,) + (1,) * (x.ndim - 1))


# The tests' keys are 'rbg' (XLA's RngBitGenerator): it compiles in a fraction of threefry's time.
draw_noise = jax.jit(lambda key: jax.random.normal(key, SHAPE, jnp.float32))


def per_step_noise(rng, num_steps: int) -> list[np.ndarray]:
  """The noise `sample` draws at each step (its documented key layout)."""
  return [np.array(draw_noise(key)) for key in jax.random.split(rng, num_steps)]


@pytest.mark.parametrize("spacing,eta", [("leading", 0.0), ("trailing", 0.5)])
def test_ddim_sample_loop_matches_diffusers(spacing, eta):
  sched = schedule_lib.make_schedule("linear")
  x_T = np.random.default_rng(9).standard_normal(SHAPE).astype(np.float32)
  rng = jax.random.key(10, impl="rbg")
  ours = jax.jit(functools.partial(sampling.sample, linear_denoiser, sampler="ddim", num_steps=10,
                                   spacing=spacing, eta=eta))(sched, x_T, rng)
  reference = diffusers_scheduler("DDIMScheduler", spacing, 10)
  noises = per_step_noise(rng, 10)
  x = torch.from_numpy(x_T)
  for i, t in enumerate(reference.timesteps):
    variance_noise = torch.from_numpy(noises[i]) if eta else None
    x = reference.step(linear_denoiser(x, t.float()), t, x, eta=eta,
                       variance_noise=variance_noise).prev_sample
  np.testing.assert_allclose(ours, x.numpy(), atol=1e-5)


@pytest.mark.parametrize("prediction_type,variance_type,spacing", [
    ("epsilon", "fixed_small", "leading"), ("v_prediction", "fixed_large", "linspace")])
def test_ddpm_sample_loop_matches_diffusers(monkeypatch, prediction_type, variance_type, spacing):
  """diffusers' DDPM steps to the next timestep of the sequence, as ours, for every spacing."""
  sched = schedule_lib.make_schedule("linear", prediction_type=prediction_type)
  x_T = np.random.default_rng(11).standard_normal(SHAPE).astype(np.float32)
  rng = jax.random.key(12, impl="rbg")
  ours = jax.jit(functools.partial(sampling.sample, linear_denoiser, num_steps=10,
                                   spacing=spacing, variance_type=variance_type))(sched, x_T, rng)
  # diffusers' DDPM step draws its own noise (on every step but t = 0): hand it ours, in order.
  noises = iter(per_step_noise(rng, 10))
  ddpm_module = importlib.import_module("diffusers.schedulers.scheduling_ddpm")
  monkeypatch.setattr(ddpm_module, "randn_tensor",
                      lambda shape, **_: torch.from_numpy(next(noises)))
  reference = diffusers_scheduler("DDPMScheduler", spacing, 10, prediction_type=prediction_type,
                                  variance_type=variance_type)
  x = torch.from_numpy(x_T)
  for t in reference.timesteps:
    x = reference.step(linear_denoiser(x, t.float()), t, x).prev_sample
  np.testing.assert_allclose(ours, x.numpy(), atol=1e-5)


def test_trajectory_keeps_every_kth_state():
  sched = schedule_lib.make_schedule("cosine")
  x_T = np.random.default_rng(13).standard_normal(SHAPE).astype(np.float32)
  final, trajectory = sampling.sample(linear_denoiser, sched, x_T, jax.random.key(0),
                                      sampler="ddim", num_steps=10, return_trajectory=True,
                                      keep_every=3)
  assert trajectory.shape == (4,) + SHAPE
  timesteps = sampling.inference_timesteps(T, 10, "leading")
  states, x = [], x_T
  for t, prev_t in zip(timesteps, sampling.previous_timesteps(timesteps)):
    x, _ = ddim_step(sched, linear_denoiser(x, np.full(2, t)), t, prev_t, x, None)
    states.append(np.asarray(x))
  np.testing.assert_allclose(trajectory, np.stack(states)[[2, 5, 8, 9]], atol=1e-5)
  np.testing.assert_array_equal(trajectory[-1], final)


def test_classifier_free_guidance():
  batch_sizes = []

  def apply_fn(x, t, labels):
    batch_sizes.append(x.shape[0])
    return x * (1.0 + labels[:, None, None, None]) + 0.01 * t[:, None, None, None]

  x = np.random.default_rng(14).standard_normal(SHAPE).astype(np.float32)
  t, labels, null_label = np.array([500, 500], np.int32), np.array([3, 5], np.int32), 10
  cond = apply_fn(x, t, labels)
  uncond = apply_fn(x, t, np.full(2, null_label))
  for scale, expected, batch in [(1.0, cond, 2), (0.0, uncond, 2),
                                 (3.0, uncond + 3.0 * (cond - uncond), 4)]:
    batch_sizes.clear()
    out = sampling.guided_denoiser(apply_fn, labels, null_label, scale)(x, t)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=f"scale {scale}")
    assert batch_sizes == [batch]


@pytest.mark.parametrize("kwargs,field", [
    (dict(sampler="euler"), "sample.sampler"),
    (dict(spacing="uniform"), "sample.spacing"),
    (dict(num_steps=0), "sample.num_steps"),
    (dict(num_steps=T + 1), "sample.num_steps"),
    (dict(variance_type="fixed_large_log"), "sample.variance_type"),
    (dict(sampler="ddim", eta=1.5), "sample.eta"),
    (dict(steps_offset=1, num_steps=T), "sample.steps_offset"),
    (dict(return_trajectory=True, keep_every=0), "sample.keep_every"),
])
def test_bad_sampler_settings_name_the_field(kwargs, field):
  kwargs = {"num_steps": 10, **kwargs}
  with pytest.raises(ValueError, match=field):
    sampling.sample(linear_denoiser, schedule_lib.make_schedule("linear"), np.zeros(SHAPE),
                    jax.random.key(0), **kwargs)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sampler, spacing", [("ddim", "trailing"), ("ddim", "linspace"),
                                              ("ddpm", "leading")])
def test_an_exact_denoiser_recovers_the_image(prediction_type, sampler, spacing):
  """Whatever the start noise, a denoiser that knows x0 leads every sampler to x0."""
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 3), minval=-1, maxval=1)
  s = schedule_lib.make_schedule("cosine", prediction_type=prediction_type)

  def exact(x, t):
    alpha_bar = jnp.asarray(s.alphas_cumprod)[t][:, None, None, None]
    noise = (x - jnp.sqrt(alpha_bar) * x0) / jnp.sqrt(1 - alpha_bar)
    return schedule_lib.training_target(s, x0, noise, t)

  out = sampling.sample(exact, s, jax.random.normal(jax.random.PRNGKey(1), x0.shape),
                        jax.random.PRNGKey(2), sampler=sampler, num_steps=7, spacing=spacing)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-5)
