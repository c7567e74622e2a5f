"""The training loop shared by every model family: `train_and_evaluate`."""

import contextlib
import functools
import time

import flax.linen as nn
import jax
import numpy as np

from train import checkpoint
from train import config_checks
from train import families
from train import flops
from train import metrics as metrics_lib
from train import optimizers
from train import profiling
from train import sharding
from train import state as state_lib
from train import steps
from train.tasks import base as base_task


def _console(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)


class _Interval:
  """Host-side metric sums between two log lines."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.sums, self.units, self.start = {}, 0, time.perf_counter()

  def add(self, step_metrics: dict, units: int) -> None:
    metrics_lib.add_sums(self.sums, dict(step_metrics, steps=1.0))
    self.units += units


def _check_finite(step: int, step_metrics: dict) -> None:
  loss = float(step_metrics["loss"])
  if not np.isfinite(loss) or not np.isfinite(float(step_metrics["grad_norm"])):
    raise FloatingPointError(
        f"Non-finite loss ({loss}) or gradient norm at step {step}: stopping before it is "
        "checkpointed. Lower opt.lr, raise opt.warmup_steps or check the data.")


class Trainer:
  """Builds everything a run needs from the config; `run()` trains."""

  def __init__(self, config, workdir: str, devices=None):
    self.config, self.workdir = config, workdir
    self.family = families.get_family(config.model.family)
    self.model, self.task = families.build_model(config.model), self.family.task
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.axis_rules(config)
    config_checks.check_run_config(config, self.model.config, self.mesh, self.rules,
                                   process_count=jax.process_count())
    self.task.check_config(config)
    num_steps = config.train.num_steps
    self.optimizer = optimizers.make_optimizer(config.opt, num_steps)
    self.schedule = optimizers.learning_rate_schedule(config.opt, num_steps)
    # Parameter shapes do not depend on the batch: init traces one row per data shard.
    self.dummy = self.task.dummy_batch(config.data,
                                       sharding.data_parallel_size(self.mesh, self.rules))
    self.keeps_ema = config.opt.ema_decay > 0
    with self.sharding_context():
      self.state_shardings = state_lib.state_shardings(
          self.model, self.task, self.optimizer, self.dummy, self.mesh, self.rules,
          ema=self.keeps_ema)
    self.batch_shardings = {
        key: jax.sharding.NamedSharding(self.mesh, nn.logical_to_mesh_axes(axes, self.rules))
        for key, axes in self.task.batch_axes().items()}
    self.train_step = jax.jit(
        functools.partial(steps.train_step, model=self.model, task=self.task,
                          optimizer=self.optimizer, config=config,
                          schedule=self.schedule),
        in_shardings=(self.state_shardings, self.batch_shardings),
        out_shardings=(self.state_shardings, None), donate_argnums=(0,))
    variable_shardings = state_lib.variables_of(self.state_shardings)
    self.eval_step = jax.jit(
        functools.partial(steps.eval_step, model=self.model, task=self.task, config=config),
        in_shardings=(variable_shardings, self.batch_shardings))

  @contextlib.contextmanager
  def sharding_context(self):
    """Mesh and logical-axis rules in scope for tracing model code."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def global_batch(self, local_batch: dict) -> dict:
    """Assembles per-host numpy slices into global arrays."""
    return {key: jax.make_array_from_process_local_data(self.batch_shardings[key], value)
            for key, value in local_batch.items() if key in self.batch_shardings}

  def _restore_or_init(self, checkpointer, data_iter):
    latest = checkpointer.latest_step()
    init = functools.partial(state_lib.init_state, self.model, self.task, self.optimizer,
                             self.dummy, self.config.seed, self.state_shardings)
    if latest is None:
      return init(), None
    abstract = state_lib.abstract_state(self.model, self.task, self.optimizer, self.dummy,
                                        ema=self.keeps_ema)
    restored, resumed = checkpointer.restore(latest, abstract, self.state_shardings, data_iter)
    if not resumed:
      _console(f"Starting from the imported params at step {latest} of {self.workdir}.")
      return init(params=restored), None
    _console(f"Resuming from the checkpoint at step {latest}.")
    return restored, latest

  def evaluate(self, variables, eval_batches) -> dict:
    sums = {}
    for local in eval_batches:
      metrics_lib.add_sums(sums, self.eval_step(variables, self.global_batch(local)))
    return self.task.summarize(sums)

  def run(self) -> dict[str, float]:
    """Trains to `train.num_steps`, evaluating, logging and checkpointing."""
    config = self.config
    num_steps, log_every = config.train.num_steps, config.train.log_every_steps
    pid, nproc = jax.process_index(), jax.process_count()
    data_iter = self.task.make_train_iterator(config, process_index=pid, process_count=nproc)
    eval_batches = self.task.make_eval_batches(
        config, process_index=pid, process_count=nproc) if config.evals.every_steps else []
    checkpointer = checkpoint.Checkpointer(self.workdir, config)
    with self.sharding_context():
      state, resume_step = self._restore_or_init(checkpointer, data_iter)
    writer = metrics_lib.MetricWriter(self.workdir, resume_step=resume_step)
    units_per_step = self.task.units_per_batch(config.data)
    rate_key = f"{self.task.throughput_unit}_per_sec"
    flops_per_step = self.task.train_flops_per_batch(self.model.config, config.data)
    peak = flops.peak_flops_per_device(jax.devices()[0].device_kind,
                                       config.train.peak_tflops_per_device)
    first_step = int(jax.device_get(state.step))
    interval, pending, final = _Interval(), [], {}
    clock = metrics_lib.StepClock(num_steps)
    profiler = profiling.StepProfiler(self.workdir, config.train.profile_first_step,
                                      config.train.profile_num_steps, _console)

    def finish_step(step, step_metrics):
      """Host side of step `step` (1-based), run after step + 1 is dispatched."""
      step_metrics = jax.device_get(step_metrics)
      _check_finite(step, step_metrics)
      clock.step_done(step)
      interval.add(step_metrics, units_per_step)
      if step % log_every == 0 or step == num_steps:
        scalars = self.task.summarize(interval.sums)
        seconds = time.perf_counter() - interval.start
        scalars[rate_key] = interval.units / seconds
        if peak and flops_per_step:
          steps_per_sec = interval.units / units_per_step / seconds
          scalars["mfu"] = steps_per_sec * flops_per_step / (peak * self.mesh.size)
        _console(metrics_lib.progress_line(step, num_steps, scalars, self.task.console_keys,
                                           rate_key=rate_key, elapsed_s=clock.elapsed(),
                                           eta_s=clock.remaining()))
        writer.write(step, scalars)
        final.update(scalars)
        interval.reset()

    def flush():
      """Finishes the step still in flight, if any."""
      while pending:
        finish_step(*pending.pop())

    try:
      with self.sharding_context():
        for step in range(first_step + 1, num_steps + 1):
          batch = self.global_batch(next(data_iter))
          state, step_metrics = profiler.run_step(step, self.train_step, state, batch)
          flush()  # The previous step's metrics, fetched while this one runs.
          pending.append((step, step_metrics))
          is_last = step == num_steps
          if eval_batches and (step % config.evals.every_steps == 0 or is_last):
            flush()
            eval_scalars = self.evaluate(state_lib.variables_of(state), eval_batches)
            writer.write(step, eval_scalars, split="eval")
            _console(f"eval at step {step}: loss {eval_scalars['loss']:.4f}")
            final.update({f"eval_{k}": v for k, v in eval_scalars.items()})
          if step % config.checkpoint.every_steps == 0 or is_last:
            flush()  # Never checkpoint a state whose loss is unchecked.
            checkpointer.save(state, data_iter, force=is_last)
        flush()
      # The EMA where the run keeps one: what sampling uses.
      trained_steps = int(jax.device_get(state.step))
      context = base_task.ReportContext(
          print=_console, workdir=self.workdir, step=trained_steps,
          write_images=functools.partial(writer.write_images, trained_steps))
      with self.sharding_context():
        final.update(self.task.report(self.model, state_lib.sampling_variables(state), config,
                                      context))
    finally:  # Even on a NaN stop, the last good checkpoint finishes writing.
      profiler.close()
      checkpointer.wait()
      checkpointer.close()
      writer.close()
      # Stops grain's prefetch thread before the interpreter exits: one left reading
      # at exit can abort the process.
      data_iter.close()
    return final


def train_and_evaluate(config, workdir: str, devices=None) -> dict[str, float]:
  """Trains the model of `config` in `workdir` (resuming if it holds a checkpoint).

  `devices` (default: all) is the device list the mesh is laid over.
  Returns the last logged train metrics, eval metrics (`eval_*`) and the task's
  closing report (e.g. `addition_accuracy`).
  """
  return Trainer(config, workdir, devices).run()
