"""Where metrics go: TensorBoard event files, WORKDIR/metrics.jsonl and the console."""

import json
import os

import jax
import numpy as np
from tensorboardX import SummaryWriter


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
  """Writes scalars from process 0 only; other hosts' writers do nothing."""

  def __init__(self, workdir: str, *, resume_step: int | None = None):
    self._enabled = jax.process_index() == 0
    self._path = os.path.join(workdir, "metrics.jsonl")
    if not self._enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._drop_entries_after(resume_step)
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
    record = {"step": step, "split": split}
    for key, value in values.items():
      value = np.asarray(value, np.float64)
      tag = f"{split}/{key}"
      if value.ndim == 0:
        self._tensorboard.add_scalar(tag, float(value), step)
        record[key] = float(value)
        continue
      if value.size <= MAX_TB_SCALARS:
        for index in np.ndindex(value.shape):
          self._tensorboard.add_scalar("/".join([tag, *map(str, index)]), value[index], step)
      else:
        self._tensorboard.add_histogram(tag, value, step)
      record[key] = value.tolist()
    self._tensorboard.flush()
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def close(self) -> None:
    if self._enabled:
      self._tensorboard.close()


_RATE_LABELS = {"tokens_per_sec": "tok/s", "examples_per_sec": "examples/s"}


def progress_line(step: int, num_steps: int, scalars: dict, console_keys=(),
                  rate_key: str = "tokens_per_sec") -> str:
  """One console line: step, loss, extra scalars named in `console_keys`, throughput
  (`scalars[rate_key]`, e.g. tokens or examples per second), MFU."""
  parts = [f"step {step}/{num_steps}", f"loss {scalars['loss']:.4f}"]
  parts += [f"{key} {scalars[key]:.4g}" for key in console_keys if key in scalars]
  if rate_key in scalars:
    label = _RATE_LABELS.get(rate_key, rate_key.replace("_per_sec", "/s"))
    parts.append(f"{scalars[rate_key]:,.0f} {label}")
  parts.append(f"MFU {scalars['mfu']:.1%}" if "mfu" in scalars else "MFU n/a (peak unknown)")
  return "  ".join(parts)
