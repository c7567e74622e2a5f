"""benchmarks/diffusion.py --smoke trains and samples on both sides and prints their ratios,
so the script cannot rot between measurements (with -m slow)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.mark.slow  # ~45 s of compiling both sides; the default suite keeps under 15 minutes.
def test_smoke_times_both_sides_and_prints_the_ratio(tmp_path):
  env = {**os.environ, "XLA_FLAGS": ""}  # One CPU device, as a user runs it.
  out = tmp_path / "diffusion.json"
  result = subprocess.run(
      [sys.executable, "benchmarks/diffusion.py", "--smoke", f"--json={out}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ratio" in result.stdout.lower(), result.stdout[-2000:]
  rows = json.loads(out.read_text())["rows"]
  assert [row["what"].split()[0] for row in rows] == ["train", "DDIM"]
  assert all(row["ratio_median"] > 0 and row["torch_images_per_s"] > 0 for row in rows)
