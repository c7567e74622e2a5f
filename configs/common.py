"""Helpers shared by experiment configs."""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses the `:key=value,key=value` suffix of `--config=configs/x.py:...`.

  Every key must be one of `defaults`; values take the type of the default.

  >>> parse_arg('size=1b', size='tiny').size
  '1b'
  """
  parsed = ml_collections.ConfigDict(defaults)
  if not arg:
    return parsed
  for item in arg.split(","):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"Config argument {item!r} must look like key=value; "
                       f"known keys: {sorted(defaults)}.")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known keys: {sorted(defaults)}.")
    kind = type(defaults[key])
    parsed[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return parsed
