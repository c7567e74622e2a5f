"""benchmarks/ssm.py --smoke times every row, prints the tables and the crossovers, and writes
its JSON, so the script cannot rot between measurements (with -m slow)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import REPO_ROOT, benchmark_script
from layers.ssm import ssd

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.slow  # ~30 s of compiling 12 rows and both layers on a quiet 2-core box.
def test_smoke_times_every_row_and_both_layers(tmp_path):
  env = {**os.environ, "XLA_FLAGS": ""}  # One CPU device, as a user runs it.
  out = tmp_path / "ssm.json"
  result = subprocess.run(
      [sys.executable, "benchmarks/ssm.py", "--smoke", f"--json={out}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ssd is faster than attention (fwd+bwd) " in result.stdout, result.stdout[-2000:]
  report = json.loads(out.read_text())
  rows = report["rows"]
  assert {(r["impl"], r["pass"], r["seq"]) for r in rows} == {
      (impl, kind, seq) for impl in ("ssd", "scan", "attention")
      for kind in ("fwd", "fwd+bwd") for seq in (64, 128)}
  assert all(r["seconds"] > 0 for r in rows)
  assert set(report["crossovers"]) == {"ssd fwd", "ssd fwd+bwd", "scan fwd", "scan fwd+bwd"}
  assert [r["what"] for r in report["layer_rows"]] == ["Mamba2Mixer fwd", "Mamba2Mixer fwd+bwd"]
  assert all(r["ratio_median"] > 0 for r in report["layer_rows"])
  assert report["meta"]["jax"] and report["meta"]["device"]


def test_sequential_scan_matches_the_chunked_ssd():
  """The benchmark's scan row computes what the ssd row does (so timing them is fair)."""
  bench = benchmark_script("ssm")
  problem = bench.Problem(batch=2, seq=40, heads=4, head_dim=8, state=6, chunk=16,
                          dtype="float32")
  inputs = bench.ssm_inputs(problem, jax.random.key(0))
  y_scan, state_scan = jax.jit(bench.sequential_scan)(*inputs)
  y_ssd, state_ssd = jax.jit(lambda *a: ssd(*a, chunk_size=16))(*inputs)
  np.testing.assert_allclose(y_scan, y_ssd, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(state_scan, state_ssd, rtol=2e-4, atol=2e-4)


def test_crossover_is_the_length_from_which_on_ssd_stays_faster():
  bench = benchmark_script("ssm")

  def rows(times):  # {length: (ssd seconds, attention seconds)}
    return [{"seq": t, "impl": impl, "pass": "fwd", "seconds": s}
            for t, pair in times.items() for impl, s in zip(("ssd", "attention"), pair)]

  assert bench.crossover(rows({256: (2, 1), 512: (1, 2), 1024: (1, 3)}), "ssd", "fwd") == (
      "from t = 512 on (slower at 256)")
  # Faster at 256, slower at 512 (noise or not): the crossover is after the last loss.
  assert bench.crossover(rows({256: (1, 2), 512: (3, 2), 1024: (1, 3)}), "ssd", "fwd") == (
      "from t = 1024 on (slower at 512)")
  assert bench.crossover(rows({256: (1, 2), 512: (1, 2)}), "ssd", "fwd") == (
      "at every measured length (t >= 256)")
  assert bench.crossover(rows({256: (1, 2), 512: (3, 2)}), "ssd", "fwd").startswith("at no length")
  assert bench.crossover(rows({256: (1, 2)}), "scan", "fwd") == "not measured"


def test_pallas_rows_time_both_gpu_kernels():
  """On a Hopper GPU the table gets a row per GPU kernel (Mosaic GPU and Triton)."""
  bench = benchmark_script("ssm")
  assert bench.pallas_rows(None) == []
  assert bench.pallas_rows("tpu_v5e") == ["ssd_pallas"]
  assert bench.pallas_rows("h100") == ["ssd_pallas", "ssd_pallas_triton"]
  assert set(bench.pallas_rows("h200")) <= set(bench.IMPLS)
