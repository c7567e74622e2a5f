"""benchmarks/rwkv7.py --smoke times the WKV-7 implementations beside attention and the
model beside the `rwkv` package, so the script cannot rot between measurements (with -m slow)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

pytest.importorskip("torch")
pytest.importorskip("rwkv")


@pytest.mark.slow  # ~45 s on a 2-core box (compiling fwd+bwd of each implementation).
def test_smoke_writes_every_row(tmp_path):
  env = {**os.environ, "XLA_FLAGS": ""}  # One CPU device, as a user runs it.
  out, report = tmp_path / "rwkv.json", tmp_path / "rwkv.md"
  result = subprocess.run(
      [sys.executable, "benchmarks/rwkv7.py", "--smoke", f"--json={out}", f"--markdown={report}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data["meta"]["jax"] and data["meta"]["backend"] == "cpu"
  rows = data["rows"]
  timed = [r for r in rows if r["section"] == "recurrence"]
  assert {r["impl"] for r in timed} == {"wkv7 sequential (xla scan)", "wkv7 chunked 16 (xla)",
                                        "attention xla (cpu-blocked)"}
  assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in timed)
  agreement = [r for r in rows if r["section"] == "agreement"]
  assert agreement and all(r["max_abs_diff_vs_sequential"] < 1e-4 for r in agreement)
  model = [r for r in rows if r["section"] == "model"]
  assert [(r["phase"], r["side"]) for r in model] == [
      ("prefill", "treadle chunked 16"), ("prefill", "treadle sequential"),
      ("prefill", "rwkv package"), ("decode", "treadle"), ("decode", "rwkv package")]
  assert all(r["tokens_per_s"] > 0 for r in model)
  # The same .pth weights: both prefills end on the same logits.
  assert all(r["max_abs_logit_diff"] < 1e-3 * max(r["logit_scale"], 1.0)
             for r in model if "max_abs_logit_diff" in r)
  assert "| prefill | rwkv package |" in report.read_text()
