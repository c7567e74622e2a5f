"""Optimizers and learning-rate schedules built from `config.opt`."""

import jax
import optax


def learning_rate_schedule(opt_config, num_steps: int) -> optax.Schedule:
  """Linear warmup to `opt.lr`, then cosine decay to `lr * end_lr_factor`."""
  warmup = int(opt_config.warmup_steps)
  decay = int(opt_config.decay_steps)
  if decay == -1:
    decay = max(num_steps - warmup, 1)
  if warmup < 0 or decay <= 0:
    raise ValueError(f"config.opt.warmup_steps={warmup} and config.opt.decay_steps="
                     f"{opt_config.decay_steps} must be >= 0 and > 0 (or -1).")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt_config.lr,
      warmup_steps=warmup,
      decay_steps=warmup + decay,
      end_value=opt_config.lr * opt_config.end_lr_factor)


# Per-channel parameters skipped by name: norm scales, biases, the Mamba mixer's
# per-head decay rate, skip weight and step-size bias, and RWKV-7's token-shift lerps,
# base decay / iclr / value-mix offsets, key scales, bonus and per-head GroupNorm.
_NO_DECAY_NAMES = ("scale", "bias", "A_log", "D", "dt_bias",
                   "x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a",
                   "r_k", "ln_x_scale", "ln_x_bias")


def _decay_mask(params):
  """Weight decay on matrices only: norms scales and biases (ndim < 2) are skipped.

  Scanned layers add a leading 'layers' dimension, so a stacked norm scale is
  2-D; the names in `_NO_DECAY_NAMES` are therefore skipped by name as well.
  """
  def wants_decay(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    return leaf.ndim >= 2 and name not in _NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(opt_config, num_steps: int) -> optax.GradientTransformation:
  """The optimizer named by `config.opt.name`, with clipping and the schedule."""
  schedule = learning_rate_schedule(opt_config, num_steps)
  name = opt_config.name
  if name == "adamw":
    core = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                       weight_decay=opt_config.weight_decay, mask=_decay_mask)
  elif name == "lion":
    core = optax.lion(schedule, b1=opt_config.b1, b2=opt_config.b2,
                      weight_decay=opt_config.weight_decay, mask=_decay_mask)
  elif name == "adafactor":
    core = optax.adafactor(schedule, weight_decay_rate=opt_config.weight_decay or None,
                           weight_decay_mask=_decay_mask)
  else:
    raise ValueError(f"config.opt.name={name!r} is not one of adamw, lion, adafactor.")
  if opt_config.clip_norm < 0:
    raise ValueError(f"config.opt.clip_norm={opt_config.clip_norm} must be >= 0 (0 disables).")
  if opt_config.clip_norm:
    return optax.chain(optax.clip_by_global_norm(opt_config.clip_norm), core)
  return core
