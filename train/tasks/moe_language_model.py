"""Next-token prediction for MoE decoders: balance losses, routing metrics, bias updates.

Adds to `LanguageModelTask`:
  * the Switch/Mixtral load-balancing loss, DeepSeek-V3's sequence-wise balance
    loss and the router z-loss, each averaged over MoE layers and weighted by
    `model.moe.aux_loss`, `model.moe.seq_aux_loss`, `model.moe.router_z_loss`;
  * DeepSeek-V3's aux-loss-free balancing: after each step every MoE layer's
    selection bias moves by `model.moe.bias_update_rate` towards the mean load,
    b += rate * sign(mean_load - load), outside the gradient;
  * metrics: per-layer expert load (fraction of assignments per expert), load
    imbalance (max load / mean load; 1 is perfectly even), dropped
    assignments (capacity mode), the balance losses and the bias range.

Shapes (layers/__init__.py): L MoE layers, E experts.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from models import moe
from train import metrics as metrics_lib
from train.tasks import language_model as lm_task

# Metric sums that summarize() turns into ratios instead of per-token means.
_COUNT_KEYS = ("moe/expert_tokens", "moe/dropped", "moe/assignments")


@dataclasses.dataclass(frozen=True)
class MoeLanguageModelTask(lm_task.LanguageModelTask):
  """`LanguageModelTask` for models with `MoeFeedForward` layers (see module doc)."""
  console_keys = ("moe/load_imbalance",)

  def init_variables(self, model, rng, batch):
    variables = super().init_variables(model, rng, batch)
    variables.pop("moe_stats", None)  # Sown by init's forward pass; not model state.
    return variables

  def loss_sums(self, model, variables, batch, rng, config, *, train=True):
    del rng, train  # Deterministic: no router noise, no dropout.
    moe_config = model.config.moe
    logits, sown = model.apply(variables, batch["inputs"], positions=batch["positions"],
                               segment_ids=batch["segment_ids"], mutable=["moe_stats"])
    loss, metrics = lm_task.next_token_sums(logits, batch, config.opt)
    stats = moe.stack_moe_layers(sown["moe_stats"])
    weight = metrics["weight"]
    # Layer means, scaled by the token count: the trainer divides every loss
    # sum by the step's total weight, so these enter the gradient as means.
    balance = jnp.mean(stats["load_balance_loss"]) * weight
    seq_balance = jnp.mean(stats["seq_balance_loss"]) * weight
    router_z = jnp.mean(stats["router_z_loss"]) * weight
    loss += (moe_config.aux_loss * balance + moe_config.seq_aux_loss * seq_balance
             + moe_config.router_z_loss * router_z)
    bias = moe.stack_moe_layers(variables["balance"])["bias"]  # [L, E]
    metrics.update({
        "moe/load_balance_loss": balance,
        "moe/seq_balance_loss": seq_balance,
        "moe/router_z_loss": router_z,
        "moe/bias_range": (jnp.max(bias, -1) - jnp.min(bias, -1)) * weight,  # [L]
        "moe/expert_tokens": stats["expert_tokens"],  # [L, E]
        "moe/dropped": stats["dropped"],  # [L]
        "moe/assignments": stats["num_tokens"] * moe_config.num_experts_per_token,  # [L]
    })
    return loss, metrics

  def update_model_state(self, model_state, metrics, model):
    rate = float(model.config.moe.bias_update_rate)
    if rate == 0.0:
      return model_state
    balance = model_state["balance"]
    bias = moe.stack_moe_layers(balance)["bias"]
    load = metrics["moe/expert_tokens"].astype(bias.dtype)  # [L, E]
    bias = bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    return {**model_state, "balance": moe.unstack_moe_layers(balance, {"bias": bias})}

  def summarize(self, sums):
    out = metrics_lib.means({k: v for k, v in sums.items() if k not in _COUNT_KEYS})
    tokens = np.asarray(sums["moe/expert_tokens"], np.float64)  # [L, E]
    load = tokens / np.maximum(tokens.sum(-1, keepdims=True), 1.0)
    imbalance = load.max(-1) * load.shape[-1]  # [L]
    dropped = np.asarray(sums["moe/dropped"], np.float64)
    assignments = np.maximum(np.asarray(sums["moe/assignments"], np.float64), 1.0)
    out.update({
        "moe/expert_load": load,
        "moe/load_imbalance_per_layer": imbalance,
        "moe/load_imbalance": float(imbalance.mean()),
        "moe/dropped_fraction_per_layer": dropped / assignments,
        "moe/dropped_fraction": float(dropped.sum() / assignments.sum()),
    })
    return out
