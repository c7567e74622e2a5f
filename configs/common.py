"""Helpers shared by experiment configs."""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses the `:key=value,key=value` suffix of `--config=configs/x.py:...`.

  Every key must be one of `defaults`; values take the type of the default. A
  bare key whose default is a bool turns it on (`:hybrid` = `:hybrid=true`).

  >>> parse_arg('size=1b', size='tiny').size
  '1b'
  """
  parsed = ml_collections.ConfigDict(defaults)
  if not arg:
    return parsed
  for item in arg.split(","):
    key, sep, value = item.partition("=")
    if not sep and isinstance(defaults.get(key), bool):
      sep, value = "=", "true"
    if not sep:
      raise ValueError(f"Config argument {item!r} must look like key=value; "
                       f"known keys: {sorted(defaults)}.")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known keys: {sorted(defaults)}.")
    kind = type(defaults[key])
    parsed[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return parsed


def set_pretraining_run(config: ml_collections.ConfigDict, *, seq_len: int, batch: int) -> None:
  """Run settings shared by the real-size configs (whose model has max_seq_len=seq_len):
  long rows, FSDP over every device,
  rematerialised blocks, a 100k-step schedule, sparse logging and checkpoints."""
  config.model.remat_policy = "dots_with_no_batch_dims_saveable"
  config.data.seq_len = seq_len
  config.data.global_batch_size = batch
  config.opt.lr = 3e-4
  config.opt.warmup_steps = 2000
  config.train.num_steps = 100_000
  config.train.log_every_steps = 100
  config.evals.every_steps = 1000
  config.checkpoint.every_steps = 1000
  config.mesh.data = 1
  config.mesh.fsdp = -1
