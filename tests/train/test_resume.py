"""A run killed with SIGKILL and resumed matches one that never stopped, bitwise: every
loss, and the final parameters' EMA (both runs keep one; `load_model` returns it).
The diffusion UNet's case repeats it with the image task, the Mamba-attention hybrid's with
both kinds of block (slow: -m slow)."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import xla_flags
from helpers.trainer import read_metrics, to_flags
from train import checkpoint
from train.data import builder

STEPS = 14
_RUN = {"data.global_batch_size": 8, "train.num_steps": STEPS, "train.log_every_steps": 1,
        "evals.every_steps": 0, "checkpoint.every_steps": 4, "checkpoint.async_save": True,
        "sample.num_scored": 0}
# family -> (config file, flags, dataset).
CASES = {
    "llama": ("configs/llama_tiny.py",
              {"data.seq_len": 32, "model.embed_dim": 32, "model.num_layers": 2,
               "model.mlp_dim": 64, "model.head_dim": 8, "model.max_seq_len": 64,
               "sample.max_new_tokens": 2, "opt.ema_decay": 0.9, **_RUN}, "treadle_corpus"),
    # Both caches' owners: Mamba blocks around an attention block (configs/mamba_tiny.py:hybrid).
    "mamba_hybrid": ("configs/mamba_tiny.py:hybrid",
                     {"data.seq_len": 32, "model.embed_dim": 32, "model.num_layers": 3,
                      "model.attention_layers": "(1,)", "model.num_heads": 4,
                      "model.head_dim": 8, "model.state_size": 8, "model.chunk_size": 16,
                      "model.attention.head_dim": 8, "model.attention.mlp_dim": 64,
                      "model.max_seq_len": 64, "model.dtype": "float32",
                      "sample.max_new_tokens": 2, "opt.ema_decay": 0.9, **_RUN},
                     "treadle_corpus"),
    "unet": ("configs/unet_tiny.py",
             {"data.name": "treadle_shapes/tiny", "model.block_out_channels": "(16,32)",
              "model.down_block_types": "('DownBlock2D','AttnDownBlock2D')",
              "model.up_block_types": "('AttnUpBlock2D','UpBlock2D')", "sample.num_steps": 1,
              "sample.num_per_class": 1, **_RUN}, "treadle_shapes/tiny"),
}


def _command(family, workdir, data_dir):
  config_file, flags, _ = CASES[family]
  return [sys.executable, "-m", "train.main", f"--config={config_file}",
          f"--workdir={workdir}"] + to_flags(dict(flags, **{"data.data_dir": data_dir}))


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=xla_flags(2))


def _logged_steps(workdir):
  try:
    return read_metrics(workdir)
  except (FileNotFoundError, ValueError):  # Not written yet, or a line mid-write.
    return {}


@pytest.mark.parametrize("family", ["llama", pytest.param("mamba_hybrid", marks=pytest.mark.slow),
                                    pytest.param("unet", marks=pytest.mark.slow)])
def test_sigkill_and_resume_reproduces_every_loss(tmp_path, family):
  data_dir = str(tmp_path / "tfds")
  builder.ensure_dataset(CASES[family][2], data_dir)
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  subprocess.run(_command(family, straight, data_dir), env=_env(), check=True,
                 capture_output=True, timeout=300)

  process = subprocess.Popen(_command(family, killed, data_dir), env=_env(),
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

  resumed = subprocess.run(_command(family, killed, data_dir), env=_env(), check=True,
                           capture_output=True, text=True, timeout=300)
  assert "Resuming from the checkpoint at step" in resumed.stdout
  expected = {step: m["loss"] for step, m in read_metrics(straight).items()}
  got = {step: m["loss"] for step, m in read_metrics(killed).items()}
  assert sorted(got) == list(range(1, STEPS + 1))
  assert got == expected  # Exact float equality: same data, RNG and arithmetic.
  # load_model gives the EMA.
  final = [jax.tree.leaves(checkpoint.load_model(w)[1]) for w in (straight, killed)]
  assert all(np.array_equal(a, b) for a, b in zip(*final))
