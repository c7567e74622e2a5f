"""A run killed with SIGKILL and resumed matches one that never stopped, bitwise."""

import os
import signal
import subprocess
import sys
import time

from helpers.trainer import read_metrics, to_flags
from train.data import builder

STEPS = 14
FLAGS = {"data.seq_len": 32, "data.global_batch_size": 8, "model.embed_dim": 32,
         "model.num_layers": 2, "model.mlp_dim": 64, "model.head_dim": 8,
         "model.max_seq_len": 64, "train.num_steps": STEPS, "train.log_every_steps": 1,
         "evals.every_steps": 0, "checkpoint.every_steps": 4, "checkpoint.async_save": True,
         "sample.num_scored": 0, "sample.max_new_tokens": 2}


def _command(workdir, data_dir):
  return [sys.executable, "-m", "train.main", "--config=configs/llama_tiny.py",
          f"--workdir={workdir}"] + to_flags(dict(FLAGS, **{"data.data_dir": data_dir}))


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _logged_steps(workdir):
  try:
    return read_metrics(workdir)
  except (FileNotFoundError, ValueError):  # Not written yet, or a line mid-write.
    return {}


def test_sigkill_and_resume_reproduces_every_loss(tmp_path):
  data_dir = str(tmp_path / "tfds")
  builder.ensure_dataset("treadle_corpus", data_dir)
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  subprocess.run(_command(straight, data_dir), env=_env(), check=True, capture_output=True,
                 timeout=300)

  process = subprocess.Popen(_command(killed, data_dir), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 240
  while max(_logged_steps(killed), default=0) < 10 and time.monotonic() < deadline:
    assert process.poll() is None, "the run ended before it could be killed"
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  checkpoints = sorted(int(n) for n in os.listdir(os.path.join(killed, "checkpoints"))
                       if n.isdigit())
  assert checkpoints and checkpoints[-1] < STEPS  # It really stopped part-way.

  resumed = subprocess.run(_command(killed, data_dir), env=_env(), check=True,
                           capture_output=True, text=True, timeout=300)
  assert "Resuming from the checkpoint at step" in resumed.stdout
  expected = {step: m["loss"] for step, m in read_metrics(straight).items()}
  got = {step: m["loss"] for step, m in read_metrics(killed).items()}
  assert sorted(got) == list(range(1, STEPS + 1))
  assert got == expected  # Exact float equality: same data, RNG and arithmetic.
