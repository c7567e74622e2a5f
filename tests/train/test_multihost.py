"""Two processes on localhost train, checkpoint and resume as one job (gloo)."""

import os
import socket
import subprocess
import sys
import time

from helpers import xla_flags
from helpers.trainer import read_metrics, to_flags
from train.data import builder

TINY = {"data.seq_len": 32, "data.global_batch_size": 8, "model.embed_dim": 32,
        "model.num_layers": 2, "model.mlp_dim": 64, "model.head_dim": 8,
        "model.max_seq_len": 64, "train.log_every_steps": 1, "evals.every_steps": 2,
        "evals.num_batches": 1, "checkpoint.every_steps": 2, "sample.num_scored": 4,
        "sample.max_new_tokens": 4,
        # One learning-rate schedule for the 4-step job and the 6-step one that resumes it:
        # the same compiled train step, which the second job reads from the test run's
        # compilation cache instead of compiling again.
        "opt.decay_steps": 10,
        # Parameters sharded over all 4 devices of the 2 processes.
        "mesh.data": 1, "mesh.fsdp": 4}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(process_id: int, port: int, workdir: str, flags: list[str], num_processes=2,
            timeout_s=60):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(2))
  command = [sys.executable, "-m", "train.main", "--config=configs/llama_tiny.py",
             f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
             f"--num_processes={num_processes}", f"--process_id={process_id}",
             f"--distributed_timeout={timeout_s}"] + flags
  return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _run_job(workdir: str, flags: list[str]) -> list[str]:
  port = _free_port()
  processes = [_launch(pid, port, workdir, flags) for pid in (0, 1)]
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def test_two_processes_train_save_and_resume(tmp_path):
  data_dir = str(tmp_path / "tfds")
  builder.ensure_dataset("treadle_corpus", data_dir)  # Built once, before both start.
  workdir = str(tmp_path / "run")
  flags = to_flags(dict(TINY, **{"data.data_dir": data_dir}))
  first = _run_job(workdir, flags + ["--config.train.num_steps=4"])
  assert "step 4/4" in first[0]
  assert "step 4/4" not in first[1]  # Only process 0 prints and writes metrics.
  assert sorted(read_metrics(workdir)) == [1, 2, 3, 4]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  # Each host saved its own data iterator position.
  iterator_files = os.listdir(os.path.join(workdir, "checkpoints", "4", "data_iter"))
  assert len([name for name in iterator_files if name.startswith("process_")]) == 2

  second = _run_job(workdir, flags + ["--config.train.num_steps=6"])
  assert "Resuming from the checkpoint at step 4" in second[0]
  assert sorted(read_metrics(workdir)) == [1, 2, 3, 4, 5, 6]
  assert "held-out additions answered right" in second[0]


def test_unreachable_coordinator_fails_within_the_timeout_in_one_line(tmp_path):
  start = time.monotonic()
  process = _launch(1, _free_port(), str(tmp_path), [], timeout_s=5)
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 1, output[-3000:]  # Not SIGABRT's 134 / -6.
  assert time.monotonic() - start < 90
  assert "Fatal Python error" not in output and "Traceback" not in output, output[-3000:]
  (error,) = [line for line in output.splitlines() if line.startswith("Error: ")]
  assert "--coordinator_address=localhost:" in error and "--distributed_timeout=5 s" in error
