"""benchmarks/cpu_vs_torch.py --smoke runs both sides and prints their ratio, so the
script cannot rot between measurements."""

import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.slow  # As the other benchmark smokes: minutes of CPU for a script check.
def test_smoke_times_both_sides_and_prints_the_ratio():
  env = {**os.environ, "XLA_FLAGS": ""}  # One CPU device, as a user runs it.
  result = subprocess.run(
      [sys.executable, "benchmarks/cpu_vs_torch.py", "--smoke", "--dtypes=float32"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ratio" in result.stdout.lower(), result.stdout[-2000:]
