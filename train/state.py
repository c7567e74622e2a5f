"""The train state, built sharded from the start."""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import optax
from jax.sharding import PartitionSpec

from train import sharding
from train.tasks.base import Task


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; checkpointed whole.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the model parameters (unboxed arrays).
    opt_state: the optimizer's state.
    rng: uint32 [2] key, split once per step for families that need noise.
    model_state: the model's non-param collections (e.g. an MoE's 'balance'
      biases), changed outside the gradient by `Task.update_model_state`;
      {} for families without one.
    ema_params: the exponential moving average of `params` (same tree) when
      `opt.ema_decay` > 0, else {}; what sampling and the closing report use.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  model_state: Any
  ema_params: Any


def split_variables(variables: dict) -> tuple[Any, dict]:
  """Flax variables -> (params, the other collections)."""
  rest = {name: value for name, value in variables.items() if name != "params"}
  return variables["params"], rest


def variables_of(state: "TrainState") -> dict:
  """{'params': ..., **model_state}: what `model.apply` takes."""
  return {"params": state.params, **state.model_state}


def sampling_variables(state: "TrainState") -> dict:
  """`variables_of(state)` with the EMA parameters where the run keeps them."""
  params = state.ema_params if state.ema_params else state.params
  return {"params": params, **state.model_state}


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def logical_state_specs(model: nn.Module, task: Task, optimizer: optax.GradientTransformation,
                        batch: dict, *, ema: bool = False) -> TrainState:
  """Logical PartitionSpecs for every leaf of the state, without allocating it."""
  boxed = jax.eval_shape(lambda: task.init_variables(model, jax.random.PRNGKey(0), batch))
  param_specs, model_state_specs = split_variables(nn.get_partition_spec(boxed))
  abstract_params = jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
      boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  # Optimizer leaves shaped like a parameter (Adam's moments) follow its spec;
  # the rest (counts, Adafactor's factored rows) are replicated.
  opt_specs = optax.tree_map_params(
      optimizer, lambda _, spec: spec, abstract_opt, param_specs,
      transform_non_params=lambda _: PartitionSpec(), is_leaf=_is_spec)
  return TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs,
                    rng=PartitionSpec(), model_state=model_state_specs,
                    ema_params=param_specs if ema else {})


def state_shardings(model, task, optimizer, batch, mesh, rules, *, ema: bool = False
                    ) -> TrainState:
  """NamedShardings of the train state on `mesh` under the logical `rules`
  (`ema`: the state keeps an EMA of the parameters)."""
  specs = logical_state_specs(model, task, optimizer, batch, ema=ema)
  return sharding.logical_to_mesh_sharding(specs, mesh, rules)


def init_state(model, task, optimizer, batch, seed: int, shardings: TrainState,
               params: Any = None) -> TrainState:
  """Initialises the state directly into `shardings` (never whole on one device).

  With `params` given (fine-tuning an imported model), they are placed as
  sharded and the optimizer and model state are created fresh. The EMA (kept
  when `shardings.ema_params` is not empty) starts equal to the parameters.
  """
  ema = bool(shardings.ema_params)
  def init(rng, given_params):
    init_rng, state_rng = jax.random.split(rng)
    params, model_state = split_variables(nn.unbox(task.init_variables(model, init_rng, batch)))
    if given_params is not None:
      params = given_params
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                      opt_state=optimizer.init(params), rng=state_rng, model_state=model_state,
                      ema_params=jax.tree.map(jax.numpy.copy, params) if ema else {})

  param_shardings = None if params is None else shardings.params
  jitted = jax.jit(init, in_shardings=(None, param_shardings), out_shardings=shardings)
  return jitted(jax.random.PRNGKey(seed), params)


def abstract_state(model, task, optimizer, batch, *, ema: bool = False) -> TrainState:
  """Shapes and dtypes of the state, for restoring a checkpoint into."""
  def init():
    params, model_state = split_variables(
        nn.unbox(task.init_variables(model, jax.random.PRNGKey(0), batch)))
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.PRNGKey(0),
                      model_state=model_state, ema_params=params if ema else {})
  return jax.eval_shape(init)
