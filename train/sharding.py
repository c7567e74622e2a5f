"""The device mesh, and logical axis names mapped onto it.

Layers name dimensions with logical axes ('embed', 'heads', ...); the config's
`logical_axis_rules` table maps those names onto the mesh axes
(data, fsdp, tensor, expert, sequence). This module turns both into
`jax.sharding.Mesh` and `NamedSharding` objects.
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh


# The physical mesh axes, in order; `config.mesh` gives each a size.
MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Resolves `config.mesh` (one int per axis, at most one -1) to axis sizes.

  Raises:
    ValueError: naming `config.mesh` when the sizes cannot tile `num_devices`.
  """
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  bad = [axis for axis, size in sizes.items() if size == 0 or size < -1]
  if bad:
    raise ValueError(f"config.mesh.{bad[0]}={sizes[bad[0]]}: each mesh axis must be a "
                     "positive size, or -1 to take the remaining devices.")
  if len(fill) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {fill}.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(
          f"config.mesh: the fixed axes multiply to {fixed}, which does not divide "
          f"the {num_devices} devices, so config.mesh.{fill[0]}=-1 cannot fill them.")
    sizes[fill[0]] = num_devices // fixed
  product = math.prod(sizes.values())
  if product != num_devices:
    desc = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
    raise ValueError(
        f"config.mesh: {desc} = {product} devices, but {num_devices} are available. "
        "Make the product equal the device count, or set one axis to -1.")
  return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the 5-axis mesh (data, fsdp, tensor, expert, sequence) over all devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  # Auto axes: XLA propagates shardings from the logical constraints.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def axis_rules(config) -> tuple[tuple[str, object], ...]:
  """The config's logical-axis table as the tuple-of-pairs Flax expects."""
  rules = []
  for logical, mesh_axes in config.logical_axis_rules:
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    rules.append((logical, mesh_axes))
  return tuple(rules)


def logical_to_mesh_sharding(logical_specs, mesh: Mesh, rules):
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def data_parallel_size(mesh: Mesh, rules) -> int:
  """How many ways the batch dimension is split (data x fsdp by default)."""
  spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
  if spec is None:
    return 1
  axes = (spec,) if isinstance(spec, str) else spec
  return math.prod(mesh.shape[axis] for axis in axes)
