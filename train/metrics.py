"""Where metrics go: TensorBoard event files, WORKDIR/metrics.jsonl and the console."""

import json
import os
import time

import jax
import numpy as np

from train import tensorboard_events


# Values a step reports once (not summed over tokens): averaged over steps.
PER_STEP_METRICS = ("grad_norm", "learning_rate")


def _scalar_or_array(value):
  value = np.asarray(value, np.float64)
  return float(value) if value.ndim == 0 else value


def add_sums(total: dict, sums: dict) -> None:
  """Adds one step's metric sums (scalars or arrays) into `total` in place."""
  for key, value in jax.device_get(sums).items():  # One transfer for the whole dict.
    value = np.asarray(value, np.float64)
    total[key] = total[key] + value if key in total else value


def means(sums: dict, per_step=PER_STEP_METRICS) -> dict:
  """Turns metric sums with a 'weight' denominator into per-token means.

  Keys in `per_step` are per-step values averaged over steps (the sums carry a
  'steps' count); everything else is divided by 'weight'. Array-valued sums
  (e.g. per-layer statistics) stay arrays.
  """
  weight = max(float(sums.get("weight", 1.0)), 1.0)
  steps = max(float(sums.get("steps", 1.0)), 1.0)
  out = {}
  for key, value in sums.items():
    if key in ("weight", "steps"):
      continue
    out[key] = _scalar_or_array(np.asarray(value) / (steps if key in per_step else weight))
  return out


MAX_TB_SCALARS = 64


class MetricWriter:
  """Writes scalars (and images) from process 0 only; other hosts' writers do nothing.

  TensorBoard event files go to WORKDIR/tensorboard (written without importing
  TensorFlow, tensorboardX or torch), scalars also to WORKDIR/metrics.jsonl.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None):
    self._enabled = jax.process_index() == 0
    self._path = os.path.join(workdir, "metrics.jsonl")
    if not self._enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._drop_entries_after(resume_step)
    self._tensorboard = tensorboard_events.EventFileWriter(os.path.join(workdir, "tensorboard"))

  def _drop_entries_after(self, step: int | None) -> None:
    """On resume, forget entries a killed run logged after its last checkpoint."""
    if not os.path.exists(self._path):
      return
    with open(self._path) as f:
      lines = [line for line in f if line.strip()]
    keep = [line for line in lines if step is not None and json.loads(line)["step"] <= step]
    with open(self._path, "w") as f:
      f.writelines(keep)

  def write(self, step: int, values: dict, split: str = "train") -> None:
    """Logs scalars, and arrays (per-layer statistics) as lists / per-element scalars.

    An array of up to `MAX_TB_SCALARS` elements becomes one TensorBoard scalar
    per element (`key/i` or `key/i/j`); a larger one a histogram. metrics.jsonl
    holds arrays as nested lists.
    """
    if not self._enabled:
      return
    record, summaries = {"step": step, "split": split}, []
    for key, value in values.items():
      value = np.asarray(value, np.float64)
      tag = f"{split}/{key}"
      if value.ndim == 0:
        summaries.append(tensorboard_events.scalar_value(tag, float(value)))
        record[key] = float(value)
        continue
      if value.size <= MAX_TB_SCALARS:
        summaries += [tensorboard_events.scalar_value("/".join([tag, *map(str, index)]),
                                                      value[index])
                      for index in np.ndindex(value.shape)]
      else:
        histogram = tensorboard_events.histogram_value(tag, value)
        summaries += [histogram] if histogram else []
      record[key] = value.tolist()
    self._tensorboard.write(step, summaries)
    self._tensorboard.flush()
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """Logs TensorBoard images (PNG), e.g. a grid of samples.

    Args:
      step: the training step they belong to.
      images: TensorBoard tag (e.g. 'samples/grid') -> uint8 array of shape
        (height, width, 3). Not written to metrics.jsonl.
    """
    if not self._enabled:
      return
    self._tensorboard.write(step, [tensorboard_events.image_value(tag, image)
                                   for tag, image in images.items()])
    self._tensorboard.flush()

  def close(self) -> None:
    if self._enabled:
      self._tensorboard.close()


_RATE_LABELS = {"tokens_per_sec": "tok/s", "examples_per_sec": "examples/s"}


def format_duration(seconds: float) -> str:
  """Console form of a duration: '7s', '1m02s', '3h05m'."""
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class StepClock:
  """Elapsed time of this process's run and an estimate of the time left.

  `step_done(step)` is called as each step's results arrive. The time per step
  is measured from the first step done onwards, so the first step's compilation
  does not inflate it, while evaluations and checkpoints in between (which
  recur) do.
  """

  def __init__(self, num_steps: int):
    self._num_steps, self._start, self._first = num_steps, time.perf_counter(), None
    self._last = None

  def step_done(self, step: int) -> None:
    self._last = (step, time.perf_counter())
    if self._first is None:
      self._first = self._last

  def elapsed(self) -> float:
    """Seconds since the clock was made (includes compilation)."""
    return time.perf_counter() - self._start

  def remaining(self) -> float | None:
    """Seconds left to `num_steps` at the measured step time; None before two steps."""
    if self._first is None or self._last[0] == self._first[0]:
      return None
    (first_step, first_time), (step, now) = self._first, self._last
    return (now - first_time) / (step - first_step) * (self._num_steps - step)


def progress_line(step: int, num_steps: int, scalars: dict, console_keys=(),
                  rate_key: str = "tokens_per_sec", elapsed_s: float | None = None,
                  eta_s: float | None = None) -> str:
  """One console line: step, loss, extra scalars named in `console_keys`, throughput
  (`scalars[rate_key]`, e.g. tokens or examples per second), MFU, then the time
  elapsed and the estimated time left when given."""
  parts = [f"step {step}/{num_steps}", f"loss {scalars['loss']:.4f}"]
  parts += [f"{key} {scalars[key]:.4g}" for key in console_keys if key in scalars]
  if rate_key in scalars:
    label = _RATE_LABELS.get(rate_key, rate_key.replace("_per_sec", "/s"))
    parts.append(f"{scalars[rate_key]:,.0f} {label}")
  parts.append(f"MFU {scalars['mfu']:.1%}" if "mfu" in scalars else "MFU n/a (peak unknown)")
  if elapsed_s is not None:
    parts.append(f"elapsed {format_duration(elapsed_s)}")
  if eta_s is not None:
    parts.append(f"eta {format_duration(eta_s)}")
  return "  ".join(parts)
