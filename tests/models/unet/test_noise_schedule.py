"""models/unet/schedule.py against diffusers' DDPMScheduler (torch, CPU) and hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.unet import schedule as schedule_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# (our name, diffusers' name, betas range): scaled_linear with latent diffusion's range.
SCHEDULES = [("linear", "linear", (1e-4, 0.02)),
             ("scaled_linear", "scaled_linear", (0.00085, 0.012)),
             ("cosine", "squaredcos_cap_v2", (1e-4, 0.02))]
PREDICTIONS = ("epsilon", "v_prediction", "sample")
T_BATCH = np.array([0, 1, 250, 999], np.int32)


def diffusers_ddpm(beta_schedule="linear", beta_range=(1e-4, 0.02), **kw):
  return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                                 beta_start=beta_range[0], beta_end=beta_range[1], **kw)


def images(seed: int, shape=(4, 5, 6, 3)) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("ours,theirs,beta_range", SCHEDULES)
def test_betas_and_alphas_cumprod_match_diffusers(ours, theirs, beta_range):
  reference = diffusers_ddpm(theirs, beta_range)
  for name in (ours, theirs):  # diffusers' alias names the same schedule
    sched = schedule_lib.make_schedule(name, 1000, *beta_range)
    assert sched.betas.dtype == np.float32 and sched.alphas_cumprod.dtype == np.float32
    np.testing.assert_allclose(sched.betas, reference.betas.numpy(), rtol=3e-7, atol=0)
    # diffusers multiplies in float32; we multiply in float64 (see the module docstring).
    np.testing.assert_allclose(sched.alphas_cumprod, reference.alphas_cumprod.numpy(),
                               rtol=2e-6, atol=0)


def test_cosine_schedule_is_the_closed_form():
  """ᾱ_t of the cosine schedule is f((t+1)/T)/f(0) wherever β is below its 0.999 cap."""
  sched = schedule_lib.make_schedule("cosine", 1000)
  t = np.arange(1000)
  f = np.cos(((t + 1) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
  f0 = np.cos(0.008 / 1.008 * np.pi / 2) ** 2
  uncapped = sched.betas < 0.999
  assert uncapped[:-1].all() and not uncapped[-1]
  np.testing.assert_allclose(sched.alphas_cumprod[uncapped], (f / f0)[uncapped], rtol=2e-5)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_add_noise_and_training_target_match_diffusers(prediction_type):
  reference = diffusers_ddpm(prediction_type=prediction_type)
  sched = schedule_lib.make_schedule("linear", prediction_type=prediction_type)
  x0, noise = images(0), images(1)
  fns = jax.jit(lambda s, x0, n, t: (schedule_lib.add_noise(s, x0, n, t),
                                     schedule_lib.training_target(s, x0, n, t)))
  noisy, target = map(np.asarray, fns(sched, x0, noise, T_BATCH))
  x0_t, noise_t, t_t = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(T_BATCH)
  # Near t = 0, 1 − ᾱ in float32 keeps ~4 digits, and the two ᾱ differ by an ulp.
  np.testing.assert_allclose(noisy, reference.add_noise(x0_t, noise_t, t_t).numpy(), atol=1e-5)
  expected = {"epsilon": noise, "sample": x0,
              "v_prediction": reference.get_velocity(x0_t, noise_t, t_t).numpy()}[prediction_type]
  np.testing.assert_allclose(target, expected, atol=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_the_training_target_predicts_x0_and_the_noise_back(prediction_type):
  sched = schedule_lib.make_schedule("cosine", prediction_type=prediction_type)
  x0, noise = images(2), images(3)
  t = np.array([10, 300, 600, 900], np.int32)
  x_t = schedule_lib.add_noise(sched, x0, noise, t)
  target = schedule_lib.training_target(sched, x0, noise, t)
  x0_hat, eps_hat = schedule_lib.predict_x0_and_eps(sched, target, x_t, t)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
  np.testing.assert_allclose(eps_hat, noise, atol=2e-4)


def test_min_snr_weights_by_hand():
  sched = schedule_lib.make_schedule("linear")
  betas = np.linspace(1e-4, 0.02, 1000)
  t = np.array([0, 20, 100, 400, 999], np.int32)
  alpha_bar = np.cumprod(1 - betas)[t]
  ratio = alpha_bar / (1 - alpha_bar)  # 9999, 158.6, 8.54, 0.240, 4.04e-5
  # rtol: 1 − ᾱ_0 = 1e-4 keeps ~4 digits in float32.
  np.testing.assert_allclose(schedule_lib.snr(sched, t), ratio, rtol=3e-4)
  gamma = 5.0
  clipped = np.minimum(ratio, gamma)
  expected = {"epsilon": clipped / ratio, "v_prediction": clipped / (ratio + 1),
              "sample": clipped}
  for prediction_type, weights in expected.items():
    sched_p = schedule_lib.make_schedule("linear", prediction_type=prediction_type)
    got = jax.jit(schedule_lib.loss_weight, static_argnums=2)(sched_p, t, gamma)
    np.testing.assert_allclose(got, weights, rtol=3e-4)
    np.testing.assert_array_equal(schedule_lib.loss_weight(sched_p, t, 0.0), np.ones(5))
  # By hand: ε weights 5/9999 at t = 0 (SNR 9999), 5/158.6 at t = 20, 1 once SNR < 5.
  np.testing.assert_allclose(schedule_lib.loss_weight(sched, t, gamma),
                             [5 / 9999, 5 / 158.6279, 5 / 8.53667, 1.0, 1.0], rtol=3e-4)


@pytest.mark.parametrize("call,field", [
    (lambda: schedule_lib.make_schedule("quadratic"), "diffusion.beta_schedule"),
    (lambda: schedule_lib.make_schedule("linear", prediction_type="x0"),
     "diffusion.prediction_type"),
    (lambda: schedule_lib.make_schedule("linear", num_train_timesteps=0),
     "diffusion.num_train_timesteps"),
    (lambda: schedule_lib.make_schedule("linear", beta_start=0.03), "diffusion.beta_start"),
    (lambda: schedule_lib.loss_weight(schedule_lib.make_schedule("linear"), T_BATCH, -1.0),
     "diffusion.min_snr_gamma"),
])
def test_bad_values_name_the_config_field(call, field):
  with pytest.raises(ValueError, match=field):
    call()


def test_schedule_is_a_pytree_with_static_settings():
  sched = schedule_lib.make_schedule("linear", 50, prediction_type="v_prediction")
  leaves, treedef = jax.tree_util.tree_flatten(sched)
  assert len(leaves) == 2
  rebuilt = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])
  assert (rebuilt.num_train_timesteps, rebuilt.prediction_type) == (50, "v_prediction")
