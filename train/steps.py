"""The train and eval steps: module-level pure functions, jitted once by the trainer."""

import jax
import jax.numpy as jnp
import optax

from train.state import TrainState


def _split_micro_batches(batch, num_micro: int):
  """[b, ...] -> [num_micro, b // num_micro, ...] for gradient accumulation."""
  def split(x):
    return x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:])
  return jax.tree.map(split, batch)


def ema_decay(step: jax.Array, opt_config) -> jax.Array:
  """The EMA decay at optimizer step `step` (0-based): a warm-up capped at `opt.ema_decay`.

  `opt.ema_warmup_power` 0 ramps as (1 + step) / (10 + step), p > 0 as
  1 - (1 + step)^-p (diffusers' EMAModel without and with `use_ema_warmup`),
  so early averages do not hold on to the random initialisation.
  """
  step = step.astype(jnp.float32)
  power = opt_config.ema_warmup_power
  ramp = (1.0 + step) / (10.0 + step) if power == 0 else 1.0 - (1.0 + step) ** -power
  return jnp.minimum(opt_config.ema_decay, ramp)


def train_step(state: TrainState, batch, *, model, task, optimizer, config,
               schedule) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch; returns the new state and metric sums.

  The loss is summed over tokens and the gradient divided by the token count
  once, so accumulating `opt.grad_accum_steps` micro-batches gives the same
  update as one large batch. The model state (non-param collections) is
  updated by the task after the optimizer step, from the step's metric sums.
  With `opt.ema_decay` > 0 the EMA of the parameters follows the new ones.
  `config` is the run config (bound by the trainer; static under jit).
  """
  opt_config = config.opt
  rng, step_rng = jax.random.split(state.rng)

  def loss_fn(params, micro, micro_rng):
    variables = {"params": params, **state.model_state}
    return task.loss_sums(model, variables, micro, micro_rng, config, train=True)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  num_micro = opt_config.grad_accum_steps
  if num_micro == 1:
    (_, metrics), grads = grad_fn(state.params, batch, step_rng)
  else:
    def accumulate(carry, micro_and_rng):
      micro, micro_rng = micro_and_rng
      (_, metrics), grads = grad_fn(state.params, micro, micro_rng)
      return jax.tree.map(jnp.add, carry, (grads, metrics)), None
    micro_batches = _split_micro_batches(batch, num_micro)
    micro_rngs = jax.random.split(step_rng, num_micro)
    (_, metrics), grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], micro_batches),
                                  micro_rngs[0])
    rest = jax.tree.map(lambda x: x[1:], (micro_batches, micro_rngs))
    (grads, metrics), _ = jax.lax.scan(accumulate, (grads, metrics), rest)
  weight = jnp.maximum(metrics["weight"], 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  model_state = task.update_model_state(state.model_state, metrics, model)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                 learning_rate=schedule(state.step))
  ema_params = state.ema_params
  if opt_config.ema_decay > 0:
    decay = ema_decay(state.step, opt_config)
    ema_params = jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype),
                              ema_params, params)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                            model_state=model_state, ema_params=ema_params)
  return new_state, metrics


def eval_step(variables, batch, *, model, task, config) -> dict:
  """Metric sums of the task's loss on one batch (no gradient).

  `variables` is {'params': ..., **model_state} (see `state.variables_of`).
  """
  _, metrics = task.loss_sums(model, variables, batch, jax.random.PRNGKey(0), config,
                              train=False)
  return metrics
