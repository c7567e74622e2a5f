"""The typed form of `config.model`: one frozen dataclass per model family.

A family's config dataclass is the one place where its fields, their defaults,
their one-line meanings and their validation live. `configs/base.py` turns it
into the `config.model` section (plus `family`); the trainer turns that
section back into the dataclass with `from_dict`, which names any unknown key
or value of the wrong type. Optional parts of a model are nested dataclasses
(`model.nsa.window`, `model.moe.num_experts`).

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class MyConfig(ModelConfig):
      family: ClassVar[str] = "mine"
      width: int = field(256, "Residual stream width.")
"""

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

HELP = "help"
# False for fields that change how a model computes but not its parameters
# (attention implementation, dtype, remat, loss weights): a checkpoint trained
# with one value loads under another.
SHAPES_PARAMS = "shapes_params"


def field(default: Any, help: str, *, shapes_params: bool = True):  # pylint: disable=redefined-builtin
  """A config field with its default and its one-line meaning."""
  return dataclasses.field(default=default,
                           metadata={HELP: help, SHAPES_PARAMS: shapes_params})


def section(cls: type, help: str):  # pylint: disable=redefined-builtin
  """A nested optional part (itself a config dataclass), default-constructed."""
  return dataclasses.field(default_factory=cls, metadata={HELP: help, SHAPES_PARAMS: True})


def _nested_types(cls: type) -> dict[str, type]:
  """Field name -> declared type, for every field of a config dataclass."""
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, kind: type, key: str) -> Any:
  """`value` as the declared scalar or tuple type; ValueError naming `key` otherwise."""
  origin = typing.get_origin(kind)
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      raise ValueError(f"{key}={value!r} must be a tuple.")
    return tuple(value)
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if kind in (int, float, str, bool):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
      raise ValueError(f"{key}={value!r} has type {type(value).__name__}; it must be "
                       f"{kind.__name__}.")
  return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConfigSection:
  """A frozen dataclass that reads itself from, and writes itself to, plain dicts."""

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], prefix: str = "model"):
    """Builds and validates from a mapping (a ConfigDict, or JSON read back).

    Fields absent from `values` take their defaults; `family` is ignored.

    Raises:
      ValueError: naming `<prefix>.<key>` for an unknown key or a wrong type.
    """
    types = _nested_types(cls)
    kwargs = {}
    for key, value in values.items():
      if key == "family" and prefix == "model":
        continue
      name = f"{prefix}.{key}"
      if key not in types:
        raise ValueError(f"{name} is not a field of {cls.__name__}; known fields: "
                         f"{sorted(types)}.")
      kind = types[key]
      if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping) and not hasattr(value, "items"):
          raise ValueError(f"{name} must be a section of fields, got {value!r}.")
        kwargs[key] = kind.from_dict(value, prefix=name)
      else:
        kwargs[key] = _coerce(value, kind, name)
    return cls(**kwargs)

  def to_dict(self) -> dict[str, Any]:
    """Field values as nested plain dicts (tuples stay tuples)."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      out[f.name] = value.to_dict() if isinstance(value, ConfigSection) else value
    return out

  @classmethod
  def help(cls, prefix: str = "model") -> dict[str, str]:
    """Dotted field name -> its one-line meaning, nested sections included."""
    lines = {}
    for f in dataclasses.fields(cls):
      kind = _nested_types(cls)[f.name]
      if dataclasses.is_dataclass(kind):
        lines.update(kind.help(f"{prefix}.{f.name}"))
      else:
        lines[f"{prefix}.{f.name}"] = f.metadata.get(HELP, "")
    return lines

  def parameter_fields(self, prefix: str = "model") -> dict[str, Any]:
    """Dotted name -> value of every field that shapes the parameters."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, ConfigSection):
        out.update(value.parameter_fields(f"{prefix}.{f.name}"))
      elif f.metadata.get(SHAPES_PARAMS, True):
        out[f"{prefix}.{f.name}"] = value
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(ConfigSection):
  """Base of a family's config: `family` names it in train/families.py; `modality`
  ('text' or 'images') picks the data and sample sections of its run config."""
  family: ClassVar[str] = ""
  modality: ClassVar[str] = "text"

  def sharded_sizes(self) -> dict[str, tuple[str, int]]:
    """Field name -> (logical axis, size) of dimensions the mesh may split.

    The trainer checks each size divides the shards its logical axis maps to
    under `config.logical_axis_rules` (e.g. heads over the tensor axis).
    """
    return {}

  def on_chip(self, chip: str) -> "ModelConfig":
    """This config with its kernel target set to `chip` (this machine's, '' on CPU)
    where it leaves the choice to the machine; families without kernels ignore it."""
    del chip
    return self

  def train_flops_per_token(self, seq_len: int) -> float | None:
    """Model FLOPs of one training token (forward + backward), for MFU; None if uncounted."""
    del seq_len
    return None
