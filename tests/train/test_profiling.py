"""config.train.profile_*: a jax.profiler trace of chosen steps in WORKDIR/profile."""

import glob
import os

import pytest

from train import profiling, trainer
from helpers.trainer import tiny_config


def test_tiny_run_writes_a_trace_of_the_chosen_steps(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  config = tiny_config(str(tmp_path / "tfds"), **{
      "train.num_steps": 3, "train.profile_first_step": 2, "train.profile_num_steps": 2,
      "checkpoint.every_steps": 100})
  trainer.train_and_evaluate(config, workdir)
  profile_dir = os.path.join(workdir, "profile")
  xplanes = glob.glob(os.path.join(profile_dir, "plugins", "profile", "*", "*.xplane.pb"))
  perfetto = glob.glob(os.path.join(profile_dir, "plugins", "profile", "*", "*.trace.json.gz"))
  assert len(xplanes) == 1 and os.path.getsize(xplanes[0]) > 0  # TensorBoard's profile plugin.
  assert len(perfetto) == 1 and os.path.getsize(perfetto[0]) > 0  # ui.perfetto.dev.
  assert f"Profile of steps 2-3 written to {profile_dir}" in capsys.readouterr().out


def test_off_by_default_and_checked(tmp_path):
  profiler = profiling.StepProfiler(str(tmp_path), first_step=10, num_steps=0)
  assert profiler.run_step(10, lambda x: x + 1, 1) == 2
  profiler.close()
  assert not os.path.exists(tmp_path / "profile")
  with pytest.raises(ValueError, match="profile_first_step=0"):
    profiling.StepProfiler(str(tmp_path), first_step=0, num_steps=2)
