"""What a model family plugs into the trainer: its batch format, loss and report.

The trainer, checkpointing and sharding are shared by every family; a `Task`
holds what differs between a language model, an MoE with balance losses, or a
diffusion UNet.
"""

from typing import Any, Protocol

import flax.linen as nn
import jax

Batch = dict[str, jax.Array]
# Metric name -> summed value; `weight` is the denominator of per-token means.
MetricSums = dict[str, jax.Array]


class Task(Protocol):
  """The family-specific half of training."""

  def batch_axes(self) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of each batch entry, e.g. {'inputs': ('batch', 'length')}."""

  def dummy_batch(self, batch_size: int, seq_len: int) -> Batch:
    """A batch of the right shapes and dtypes, for `init` and compilation."""

  def init_params(self, model: nn.Module, rng: jax.Array, batch: Batch) -> Any:
    """`model.init` on a dummy batch; returns the (logically boxed) params."""

  def loss_sums(self, model: nn.Module, params: Any, batch: Batch, rng: jax.Array,
                opt_config) -> tuple[jax.Array, MetricSums]:
    """Summed training loss (differentiated) and metric sums incl. 'weight'."""

  def report(self, model: nn.Module, params: Any, config, print_fn) -> dict[str, float]:
    """Runs after training: samples / scores, printed, returned as metrics."""
