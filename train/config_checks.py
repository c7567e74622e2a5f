"""Checks that turn a bad config into an error naming the field and the fix.

The family's config dataclass validates its own fields when built; the task
checks its data against the model (`Task.check_config`); this module checks
what involves the mesh and the run sections.
"""

import math

import flax.linen as nn
from jax.sharding import Mesh

from models.config_schema import ModelConfig
from train import sharding


def _mesh_axes_of(logical: str, rules) -> tuple[str, ...]:
  spec = nn.logical_to_mesh_axes((logical,), rules)[0]
  if spec is None:
    return ()
  return (spec,) if isinstance(spec, str) else tuple(spec)


def check_sharded_sizes(model_config: ModelConfig, mesh: Mesh, rules) -> None:
  """Each sharded model dimension divides the mesh axes its logical axis maps to."""
  for field, (logical, size) in model_config.sharded_sizes().items():
    axes = _mesh_axes_of(logical, rules)
    shards = math.prod(mesh.shape[axis] for axis in axes)
    if size % shards:
      where = " x ".join(f"mesh.{axis}={mesh.shape[axis]}" for axis in axes)
      raise ValueError(f"model.{field}={size} is not divisible by {where} (its logical axis "
                       f"{logical!r} is split that many ways under logical_axis_rules): "
                       "choose mesh sizes that divide it.")


def check_run_config(config, model_config: ModelConfig, mesh: Mesh, rules, *,
                     process_count: int) -> None:
  """Raises ValueError for run settings that would fail later or train wrongly."""
  check_sharded_sizes(model_config, mesh, rules)
  d = config.data
  batch_ways = sharding.data_parallel_size(mesh, rules)
  accum = config.opt.grad_accum_steps
  if accum < 1:
    raise ValueError(f"opt.grad_accum_steps={accum} must be >= 1.")
  micro_batch = d.global_batch_size // accum
  if d.global_batch_size % accum or micro_batch % batch_ways:
    raise ValueError(
        f"data.global_batch_size={d.global_batch_size} must split into "
        f"opt.grad_accum_steps={accum} micro-batches, each divisible by the {batch_ways} "
        "data-parallel shards (mesh.data x mesh.fsdp x mesh.expert): pick a multiple of "
        f"{accum * batch_ways}.")
  if d.global_batch_size % process_count:
    raise ValueError(f"data.global_batch_size={d.global_batch_size} is not divisible by the "
                     f"{process_count} processes: each host loads an equal slice.")
  if config.train.num_steps < 1 or config.train.log_every_steps < 1:
    raise ValueError("train.num_steps and train.log_every_steps must be >= 1.")
