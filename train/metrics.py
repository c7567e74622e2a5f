"""Where metrics go: TensorBoard event files, WORKDIR/metrics.jsonl and the console."""

import json
import os

import jax
import numpy as np
from tensorboardX import SummaryWriter


def means(sums: dict) -> dict[str, float]:
  """Turns metric sums with a 'weight' denominator into per-token means.

  'grad_norm' and 'learning_rate' are per-step values averaged over steps
  (their sums carry a 'steps' count); everything else is divided by 'weight'.
  """
  weight = max(float(sums.get("weight", 1.0)), 1.0)
  steps = max(float(sums.get("steps", 1.0)), 1.0)
  out = {}
  for key, value in sums.items():
    if key in ("weight", "steps"):
      continue
    out[key] = float(value) / (steps if key in ("grad_norm", "learning_rate") else weight)
  return out


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

  def write(self, step: int, scalars: dict[str, float], split: str = "train") -> None:
    if not self._enabled:
      return
    for key, value in scalars.items():
      self._tensorboard.add_scalar(f"{split}/{key}", value, step)
    self._tensorboard.flush()
    record = {"step": step, "split": split}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def close(self) -> None:
    if self._enabled:
      self._tensorboard.close()


def progress_line(step: int, num_steps: int, scalars: dict[str, float]) -> str:
  """One console line: step, loss, throughput and MFU when known."""
  parts = [f"step {step}/{num_steps}", f"loss {scalars['loss']:.4f}"]
  if "tokens_per_sec" in scalars:
    parts.append(f"{scalars['tokens_per_sec']:,.0f} tok/s")
  parts.append(f"MFU {scalars['mfu']:.1%}" if "mfu" in scalars else "MFU n/a (peak unknown)")
  return "  ".join(parts)
