"""What a model family plugs into the trainer: its batch format, loss and report.

The trainer, checkpointing and sharding are shared by every family; a `Task`
holds what differs between a language model, an MoE with balance losses, or a
diffusion UNet.

Variables follow Flax: `{'params': ..., <other collections>}`. Only 'params'
is trained by gradient; the other collections (the model state, e.g. an MoE's
'balance' biases) are kept in `TrainState.model_state`, checkpointed with it,
and changed after each step by `update_model_state`.
"""

from typing import Any, Protocol

import flax.linen as nn
import jax

Batch = dict[str, jax.Array]
# Metric name -> summed value (a scalar, or an array such as per-layer expert
# loads); `weight` is the denominator of per-token means.
MetricSums = dict[str, jax.Array]
Variables = dict[str, Any]


class Task(Protocol):
  """The family-specific half of training."""

  def batch_axes(self) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of each batch entry, e.g. {'inputs': ('batch', 'length')}."""

  def dummy_batch(self, batch_size: int, seq_len: int) -> Batch:
    """A batch of the right shapes and dtypes, for `init` and compilation."""

  def init_variables(self, model: nn.Module, rng: jax.Array, batch: Batch) -> Variables:
    """`model.init` on a dummy batch; returns every collection (logically boxed)."""

  def loss_sums(self, model: nn.Module, variables: Variables, batch: Batch, rng: jax.Array,
                opt_config) -> tuple[jax.Array, MetricSums]:
    """Summed training loss (differentiated in variables['params']) and metric sums
    incl. 'weight'."""

  def update_model_state(self, model_state: Variables, metrics: MetricSums,
                         opt_config) -> Variables:
    """The non-param collections after an optimizer step, from that step's metric sums."""

  def summarize(self, sums: MetricSums) -> dict[str, Any]:
    """Host-side metric sums of one or more steps -> the values logged (floats or arrays)."""

  def report(self, model: nn.Module, variables: Variables, config, print_fn) -> dict[str, float]:
    """Runs after training: samples / scores, printed, returned as metrics."""
