"""Orbax checkpoints of a run: params, optimizer state, data position, config.

Layout: `WORKDIR/checkpoints/<step>/` with items
  params       the model parameters,
  model_state  the model's other collections (an MoE's balance biases), for
               families that have them; params + model_state are what a
               notebook or the sampler needs,
  ema_params   the exponential moving average of the params, for runs that
               keep one (`opt.ema_decay` > 0); `load_model` prefers it,
  train_state  step, optimizer state and RNG,
  data_iter    each host's grain iterator position,
  config       the run config as JSON (the model is rebuilt from it).
The main binary also writes that JSON to `WORKDIR/config.json` at start-up.
Checkpoints written by `train.convert import` hold only params and config;
training on such a directory starts from those params with a fresh optimizer.
Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact.
"""

import json
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from train import families

ITEMS = ("params", "model_state", "ema_params", "train_state", "data_iter", "config")
# TrainState fields saved as their own item when not empty -> why a run keeps one.
_OPTIONAL_STATE = {
    "model_state": "the {config.model.family} model's non-param collections",
    "ema_params": "config.opt.ema_decay={config.opt.ema_decay}",
}
CONFIG_FILE = "config.json"


def config_json(config: ml_collections.ConfigDict) -> dict:
  """The run config as checkpoints (and WORKDIR/config.json) hold it: plain JSON values."""
  return config.to_dict()


def write_config(workdir: str, config: ml_collections.ConfigDict) -> epath.Path:
  """Writes `config_json(config)` to WORKDIR/config.json (readable without orbax);
  returns the path."""
  path = epath.Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(config_json(config), indent=2) + "\n")
  return path


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def _manager(workdir: str, *, keep: int | None = None, async_save: bool = False,
             read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
      read_only=read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def model_config_differences(saved: dict, current: dict) -> list[str]:
  """Lines naming each `model.<field>` that shapes the parameters and differs between
  two `config.model` sections (fields that only change how the model computes,
  such as attention_impl, dtype or remat_policy, may differ: see
  models.config_schema.SHAPES_PARAMS)."""
  if saved.get("family") != current.get("family"):
    return [f"model.family: checkpoint has {saved.get('family')!r}, "
            f"config has {current.get('family')!r}"]
  saved_fields = families.model_config(saved).parameter_fields()
  current_fields = families.model_config(current).parameter_fields()
  return [f"{key}: checkpoint has {saved_fields[key]!r}, config has {current_fields[key]!r}"
          for key in sorted(saved_fields) if saved_fields[key] != current_fields[key]]


def _has_item(manager: ocp.CheckpointManager, step: int, item: str) -> bool:
  return (epath.Path(manager.directory) / str(step) / item).exists()


def _with_shardings(abstract, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


class Checkpointer:
  """Saves and restores one run's checkpoints (see the module docstring)."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self._config = config
    self._manager = _manager(workdir, keep=config.checkpoint.keep,
                             async_save=config.checkpoint.async_save)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def check_compatible(self, step: int) -> None:
    """Raises ValueError naming every model field that differs from the checkpoint."""
    saved_model = _read_config(self._manager, step).model.to_dict()
    differences = model_config_differences(saved_model, self._config.model.to_dict())
    if differences:
      raise ValueError(
          f"The checkpoint at {checkpoint_dir('')}/{step} in this workdir was written for a "
          "different model; refusing to load it:\n  " + "\n  ".join(differences) +
          "\nUse the same model config, or a new --workdir.")

  def save(self, state, data_iter, *, force: bool = False) -> None:
    """Starts saving `state` at its step (asynchronously if configured)."""
    step = int(jax.device_get(state.step))
    rest = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    items = dict(params=ocp.args.StandardSave(state.params),
                 train_state=ocp.args.StandardSave(rest),
                 data_iter=grain.checkpoint.CheckpointSave(data_iter),
                 config=ocp.args.JsonSave(config_json(self._config)))
    for name in _OPTIONAL_STATE:
      if getattr(state, name):
        items[name] = ocp.args.StandardSave(getattr(state, name))
    self._manager.save(step, force=force, args=ocp.args.Composite(**items))

  def restore(self, step: int, abstract_state, shardings, data_iter):
    """Restores the state at `step` into `shardings`, and the iterator in place.

    Returns:
      (state, resumed): `resumed` is False for a params-only (imported)
      checkpoint, whose optimizer state the caller must create.
    """
    self.check_compatible(step)
    target = _with_shardings(abstract_state, shardings)
    if not _has_item(self._manager, step, "train_state"):
      restored = self._manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(target.params)))
      return restored["params"], False
    rest = {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}
    items = dict(params=ocp.args.StandardRestore(target.params),
                 train_state=ocp.args.StandardRestore(rest),
                 data_iter=grain.checkpoint.CheckpointRestore(data_iter))
    optional = {name: getattr(target, name) for name in _OPTIONAL_STATE
                if getattr(target, name)}
    for name, value in optional.items():
      if not _has_item(self._manager, step, name):
        raise ValueError(f"The checkpoint at step {step} has no {name} item, which this run "
                         f"keeps ({_OPTIONAL_STATE[name].format(config=self._config)}); it was "
                         "written by another model or run config. Use a new --workdir.")
      items[name] = ocp.args.StandardRestore(value)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    rest = restored["train_state"]
    state = abstract_state.replace(
        step=rest["step"], params=restored["params"], opt_state=rest["opt_state"],
        rng=rest["rng"], **{name: restored[name] if name in optional else {}
                            for name in _OPTIONAL_STATE})
    return state, True

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def save_imported(workdir: str, params: Any, config: ml_collections.ConfigDict) -> None:
  """Writes a params-only checkpoint at step 0 (for `train.convert import`)."""
  if checkpoint_dir(workdir).exists() and any(checkpoint_dir(workdir).iterdir()):
    raise FileExistsError(f"{checkpoint_dir(workdir)} already holds checkpoints; "
                          "import into an empty workdir.")
  manager = _manager(workdir)
  manager.save(0, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config_json(config))))
  manager.wait_until_finished()
  manager.close()


def _latest(manager: ocp.CheckpointManager, workdir: str) -> int:
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint under {checkpoint_dir(workdir)}: train there "
                            "first (python -m train.main --workdir=...) or import one.")
  return step


def _read_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(restored["config"])


def load_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The run config saved with the latest (or given) checkpoint in `workdir`."""
  manager = _manager(workdir, read_only=True)
  config = _read_config(manager, _latest(manager, workdir) if step is None else step)
  manager.close()
  return config


def load_model(workdir: str, step: int | None = None, *, dtype: str | None = None,
               attention_impl: str = "auto", use_ema: bool = True):
  """The model and its variables from the latest (or given) checkpoint.

  For notebooks and the sampler: variables land on the default device. The
  model uses `attention_impl` (default 'auto': what runs on this machine)
  whatever the run trained with, so a GPU run's checkpoint loads on a CPU laptop.
  `dtype` (e.g. 'float32', for parity checks) replaces the computation dtype
  the run trained with; None keeps it.
  Returns (model, variables) with variables = {'params': ..., **model_state}
  (a checkpoint without a model_state item, e.g. an imported one, gets the
  model's initial state: zero MoE balance biases). 'params' are the EMA of the
  parameters where the run kept one (a diffusion model samples from those),
  unless `use_ema` is False.

  >>> model, variables = load_model(workdir)
  >>> logits = model.apply(variables, tokens)  # [b, t] -> [b, t, v]
  """
  manager = _manager(workdir, read_only=True)
  step = _latest(manager, workdir) if step is None else step
  config = _read_config(manager, step)
  model_section = config.model.to_dict()
  # Kernel chips '' are this machine's, resolved when the model is built.
  overrides = {"attention_impl": attention_impl, "attention_chip": "", "rwkv_chip": "",
               "ssm_chip": "", "dtype": dtype}
  model_section.update({key: value for key, value in overrides.items()
                        if key in model_section and value is not None})
  family = families.get_family(model_section["family"])
  model = families.build_model(model_section)
  batch = family.task.dummy_batch(config.data, 1)

  def init():
    return nn.unbox(family.task.init_variables(model, jax.random.PRNGKey(0), batch))

  abstract = jax.eval_shape(init)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract)
  params_target = target["params"]
  state_target = {name: value for name, value in target.items() if name != "params"}
  params_item = "ema_params" if use_ema and _has_item(manager, step, "ema_params") else "params"
  items = {params_item: ocp.args.StandardRestore(params_target)}
  if state_target and _has_item(manager, step, "model_state"):
    items["model_state"] = ocp.args.StandardRestore(state_target)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  manager.close()
  if "model_state" in items:
    model_state = restored["model_state"]
  elif state_target:
    # Only the state is returned, so XLA drops the parameter initialisation.
    model_state = jax.jit(lambda: {k: v for k, v in init().items() if k != "params"})()
  else:
    model_state = {}
  return model, {"params": restored[params_item], **model_state}
