"""What a model family plugs into the trainer: its data, batch format, loss and report.

The trainer, checkpointing and sharding are shared by every family; a `Task`
holds what differs between a language model, an MoE with balance losses, or a
diffusion UNet. A task is built from its family's `models.family.ModelFamily`.

Variables follow Flax: `{'params': ..., <other collections>}`. Only 'params'
is trained by gradient; the other collections (the model state, e.g. an MoE's
'balance' biases) are kept in `TrainState.model_state`, checkpointed with it,
and changed after each step by `update_model_state`.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import flax.linen as nn
import grain
import jax
import numpy as np

Batch = dict[str, jax.Array]
HostBatch = dict[str, np.ndarray]
# Metric name -> summed value (a scalar, or an array such as per-layer expert
# loads); `weight` is the denominator of per-token (per-example) means.
MetricSums = dict[str, jax.Array]
Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ReportContext:
  """Where a task's closing report goes.

  Attributes:
    print: prints a line on the console (process 0 only).
    workdir: the run's workdir (e.g. for WORKDIR/samples/).
    step: the step the reported variables were trained to.
    write_images: logs {name: uint8 [H, W, 3]} images to TensorBoard at `step`.
  """
  print: Callable[[str], None]
  workdir: str
  step: int
  write_images: Callable[[dict[str, np.ndarray]], None]


class Task(Protocol):
  """The family-specific half of training.

  Attributes:
    modality: what the task reads and samples: 'text' (prompts in, completions
      out) or 'images' (class labels in, images out).
    throughput_unit: what the progress line counts per second ('tokens' for
      text, 'examples' for images).
    console_keys: logged scalars shown on the console line besides the loss.
  """
  modality: str
  throughput_unit: str
  console_keys: tuple[str, ...]

  # --- Data: each host loads only its own slice of every global batch.

  def check_config(self, config) -> None:
    """Raises ValueError naming the field when the data and the model disagree."""

  def make_train_iterator(self, config, *, process_index: int,
                          process_count: int) -> grain.DatasetIterator:
    """Endless batches of this host's rows, checkpointable (get_state / set_state)."""

  def make_eval_batches(self, config, *, process_index: int,
                        process_count: int) -> list[HostBatch]:
    """This host's rows of `config.evals.num_batches` fixed eval batches."""

  def batch_axes(self) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of each batch entry, e.g. {'inputs': ('batch', 'length')}."""

  def dummy_batch(self, data_config, batch_size: int) -> HostBatch:
    """A batch of the right shapes and dtypes, for `init` and compilation."""

  def units_per_batch(self, data_config) -> int:
    """Throughput units (tokens, examples) in one global batch."""

  def train_flops_per_batch(self, model_config, data_config) -> float | None:
    """Model FLOPs of one training step on a global batch, for MFU; None if uncounted."""

  # --- The model.

  def init_variables(self, model: nn.Module, rng: jax.Array, batch: Batch) -> Variables:
    """`model.init` on a dummy batch; returns every collection (logically boxed)."""

  def loss_sums(self, model: nn.Module, variables: Variables, batch: Batch, rng: jax.Array,
                config, *, train: bool) -> tuple[jax.Array, MetricSums]:
    """Summed loss (differentiated in variables['params']) and metric sums incl.
    'weight'. `config` is the run config (static under jit); `train` False in
    evaluation (no dropout, no label dropout)."""

  def update_model_state(self, model_state: Variables, metrics: MetricSums,
                         model: nn.Module) -> Variables:
    """The non-param collections after an optimizer step, from that step's metric sums."""

  def summarize(self, sums: MetricSums) -> dict[str, Any]:
    """Host-side metric sums of one or more steps -> the values logged (floats or arrays)."""

  # --- After training.

  def sample(self, model: nn.Module, variables: Variables, config,
             requests: Sequence[Any]) -> Any:
    """Samples under `config.sample` (for `python -m train.sample`): completions
    (list[str]) of text prompts, or images (float [n, H, W, c] in [-1, 1]) of
    class labels."""

  def report(self, model: nn.Module, variables: Variables, config,
             context: ReportContext) -> dict[str, float]:
    """Runs after training on the variables sampling uses (the EMA where kept):
    samples / scores, printed, returned as metrics."""
