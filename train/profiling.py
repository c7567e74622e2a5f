"""A `jax.profiler` trace of chosen train steps, written to WORKDIR/profile.

`config.train.profile_num_steps` > 0 traces steps profile_first_step ..
profile_first_step + profile_num_steps - 1 (1-based, as the loop counts them;
pick a first step after the compiling one). The trace opens in TensorBoard's
profile plugin (`tensorboard --logdir=WORKDIR/profile`) and, from the
`*.trace.json.gz` file beside it, in Perfetto (ui.perfetto.dev). Works alike on
CPU, GPU and TPU. Only process 0 traces (its own devices): under SPMD every
host runs the same program.
"""

import os

import jax


class StepProfiler:
  """Starts the trace before the first chosen step, stops it once the last has run.

  Attributes:
    directory: where the trace goes (WORKDIR/profile).
    first_step, last_step: the traced steps, inclusive (1-based).
  """

  def __init__(self, workdir: str, first_step: int, num_steps: int, print_fn=print):
    if num_steps < 0 or (num_steps and first_step < 1):
      raise ValueError(f"config.train.profile_first_step={first_step} must be >= 1 and "
                       f"config.train.profile_num_steps={num_steps} >= 0 (0 disables).")
    self.directory = os.path.join(workdir, "profile")
    self.first_step, self.last_step = first_step, first_step + num_steps - 1
    self._enabled = num_steps > 0 and jax.process_index() == 0
    self._tracing, self._traced = False, []
    self._print = print_fn

  def run_step(self, step: int, step_fn, *args):
    """`step_fn(*args)` for loop step `step`, traced when it is one of the chosen steps.

    On the last traced step this blocks until the step's outputs are ready, so
    the trace holds its device work, then writes the trace.
    """
    if self._enabled and step == self.first_step:
      jax.profiler.start_trace(self.directory)
      self._tracing = True
    if not self._tracing:
      return step_fn(*args)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      outputs = step_fn(*args)
    self._traced.append(step)
    if step == self.last_step:
      jax.block_until_ready(outputs)
      self.close()
    return outputs

  def close(self) -> None:
    """Writes the trace if one is running (a run that ends inside the traced steps)."""
    if self._tracing:
      self._tracing = False
      jax.profiler.stop_trace()
      self._print(f"Profile of steps {self._traced[0]}-{self._traced[-1]} written to "
                  f"{self.directory} (tensorboard --logdir={self.directory}, or the "
                  "*.trace.json.gz file in ui.perfetto.dev).")

