"""What the main binary says about a run before it starts: a few lines, not the whole config.

The full config goes to WORKDIR/config.json (`checkpoint.write_config`); the
console gets the family, the config file (with its argument, e.g. the size),
the device mesh and the overrides given on the command line.
"""

from train import checkpoint
from train import sharding


def _format_value(value) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def summary(config, *, source: str, overrides: dict, num_devices: int) -> str:
  """One line, e.g.
  'llama (configs/llama.py:size=1b) on 8 devices, mesh fsdp=8; overrides: opt.lr=0.0003'.

  Args:
    config: the run config.
    source: the config file and its argument, as given to --config.
    overrides: dotted key -> value of each --config.<key>=value given.
    num_devices: devices in the job (all processes).
  """
  shape = sharding.mesh_shape(config.mesh, num_devices)
  split = " ".join(f"{axis}={size}" for axis, size in shape.items() if size > 1)
  devices = f"{num_devices} device{'s' if num_devices != 1 else ''}"
  line = f"{config.model.family} ({source}) on {devices}" + (f", mesh {split}" if split else "")
  given = ", ".join(f"{key}={_format_value(value)}" for key, value in overrides.items())
  return f"{line}; overrides: {given or 'none'}"


def announce(config, workdir: str, *, source: str, overrides: dict, num_devices: int) -> None:
  """Writes WORKDIR/config.json and prints the summary and that path (call on process 0)."""
  path = checkpoint.write_config(workdir, config)
  line = summary(config, source=source, overrides=overrides, num_devices=num_devices)
  print(f"Run: {line}\nFull config: {path}", flush=True)
