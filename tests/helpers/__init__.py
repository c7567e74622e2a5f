"""Helpers shared by the tests (tests/ is on sys.path through tests/conftest.py).

  trainer.py   tiny run configs and metrics readers for end-to-end tests
  colabs.py    runs a notebook in a fresh kernel
  images.py    image data configs (train/data/images/pipeline.py)
  ssd_reference.py   the token-by-token Mamba-2 recurrence, oracle of layers/ssm/ssd.py
  wkv7_reference.py  the token-by-token RWKV-7 WKV recurrence, oracle of layers/rwkv/wkv7.py
  diffusers_models.py  random, perturbed diffusers UNet2DModels and their predictions (NHWC)
  unet_params.py     random UNet params from the abstract init (no compiled init)

and, here, REPO_ROOT, benchmark_script(name) (a benchmarks/ script as a module) and
xla_flags(devices) for the processes that tests launch.
"""

import functools
import importlib.util
import os
import re

# The repository root: the working directory of subprocess tests and the colabs.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.cache  # Once per process: a script's absl flags can be defined only once.
def benchmark_script(name: str):
  """benchmarks/<name>.py as a module (benchmarks/ is a folder of scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO_ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process a test launches: the test run's (tests/conftest.py's compile
  settings) with `devices` fake CPU devices instead of eight."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  return " ".join(flags.split() + [f"--xla_force_host_platform_device_count={devices}"])
