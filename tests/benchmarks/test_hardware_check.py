"""benchmarks/hardware_check.py: the --smoke run end to end, and how steps are isolated.

The smoke run is the hardware check at tiny sizes on CPU (kernels interpreted,
hardware tests collected and skipped), so the script cannot rot between GPU runs.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from helpers import REPO_ROOT, benchmark_script

REPO = pathlib.Path(REPO_ROOT)


def _hardware_check():
  return benchmark_script("hardware_check")


def test_the_check_runs_every_layer_case():
  hc, layer_check = _hardware_check(), benchmark_script("hardware_layer_check")
  assert sorted(hc.LAYER_CASES) == sorted(layer_check.CASES)
  assert set(hc.SMOKE_LAYER_CASES) <= set(layer_check.CASES)


def _run_smoke(out: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # One CPU device, as on a developer's machine (conftest.py fakes eight for the tests).
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.pop("XLA_FLAGS", ""))
  if flags.strip():
    env["XLA_FLAGS"] = flags.strip()
  proc = subprocess.run([sys.executable, "benchmarks/hardware_check.py", "--smoke",
                         f"--out={out}", *extra], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=1200, check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  return proc


def test_smoke_runs_a_step_of_each_stage(tmp_path):
  """The default suite's check: one step of each stage (the whole plan runs with -m slow)."""
  proc = _run_smoke(tmp_path, "--only=jax devices,test_ssd_kernel,layers attention_d64,"
                    "benchmarks/rwkv7,train/rwkv_tiny")
  results = json.loads((tmp_path / "results.json").read_text())
  steps = {(s["stage"], s["name"]): s for s in results["steps"]}
  assert sorted(steps) == [("benchmarks", "rwkv7"), ("kernels", "layers attention_d64"),
                           ("kernels", "test_ssd_kernel"), ("probe", "jax devices"),
                           ("train", "rwkv_tiny")]
  assert {s["status"] for s in steps.values()} == {"ok"}, steps
  assert steps[("kernels", "test_ssd_kernel")]["rows"][0]["skipped"] > 0
  assert steps[("kernels", "layers attention_d64")]["rows"][0]["ok"]
  assert steps[("benchmarks", "rwkv7")]["rows"]
  assert steps[("train", "rwkv_tiny")]["rows"][0]["tokens_per_s"] > 0
  assert "5/5 steps ok" in proc.stdout


@pytest.mark.slow
def test_smoke_runs_every_stage(tmp_path):
  proc = _run_smoke(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "results.json", "summary.md"]

  results = json.loads((tmp_path / "results.json").read_text())
  assert results["smoke"] and results["device"]["platform"] == "cpu"
  steps = {(s["stage"], s["name"]): s for s in results["steps"]}
  assert {s["status"] for s in steps.values()} == {"ok"}, [
      (key, s["status"], s["failure"]) for key, s in steps.items() if s["status"] != "ok"]
  by_stage = {}
  for (stage, _), step in steps.items():
    by_stage.setdefault(stage, []).append(step)
  assert sorted(by_stage) == ["benchmarks", "kernels", "probe", "train"]

  # Stage 1: the hardware test files (flash, block-sparse, NSA, SSD, WKV-7) collected and
  # skipped here; the layer checks really ran the interpreted kernels.
  pytest_steps = [s for s in by_stage["kernels"] if "pytest" in s["argv"]]
  assert {s["name"] for s in pytest_steps} >= {
      "test_flash_attention", "test_block_sparse_attention", "test_nsa_selection",
      "test_ssd_kernel", "test_wkv7_pallas"}
  assert all(s["rows"][0]["skipped"] > 0 and s["rows"][0]["failed"] == 0 for s in pytest_steps)
  for case in ("attention_d64", "nsa_d64"):
    (row,) = steps[("kernels", f"layers {case}")]["rows"]
    assert row["ok"] and row["worst_rel_max"] < 5e-2

  # Stage 2: each benchmark wrote rows with timings.
  for name in ("attention", "sparse_attention", "moe"):
    rows = steps[("benchmarks", name)]["rows"]
    assert rows and all(r.get("fwd_bwd_ms", r.get("ms")) > 0 for r in rows), (name, rows)
  for name in ("diffusion", "ssm", "rwkv7"):  # One JSON document each, rows under "rows".
    assert steps[("benchmarks", name)]["rows"], name
  impls = {r["impl"] for r in steps[("benchmarks", "sparse_attention")]["rows"]}
  assert {"sparse causal window 64", "nsa core xla"} <= impls

  # Stage 3: tokens/s from each tiny run: both attention impls, the MoE, the recurrent ones.
  train = {s["name"]: s["rows"] for s in by_stage["train"]}
  assert set(train) == {"llama_tiny xla", "llama_tiny pallas", "moe_tiny", "mamba_tiny",
                        "rwkv_tiny"}
  assert all(rows[0]["tokens_per_s"] > 0 for rows in train.values())

  summary = (tmp_path / "summary.md").read_text()
  assert "| kernels | layers nsa_d64 | ok |" in summary
  assert "## benchmarks/attention" in summary
  assert f"{len(steps)}/{len(steps)} steps ok" in proc.stdout


def _alive(pid: int) -> bool:
  try:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
  except FileNotFoundError:
    return False
  return "\nState:\tZ" not in status  # A zombie has already exited.


def test_hang_failure_and_deadline_are_recorded_and_the_rest_runs(tmp_path):
  """A hung step is killed with its children at its budget; a failure keeps its error;
  later steps still run; past the global deadline steps are skipped."""
  hc = _hardware_check()
  pid_file = tmp_path / "grandchild.pid"
  hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
          "'import time; time.sleep(120)']); open(sys.argv[1], 'w').write(str(p.pid)); "
          "time.sleep(120)")
  rows = "import json, sys; open(sys.argv[1], 'a').write(json.dumps(dict(x=1)) + '\\n')"
  steps = [hc.Step("t", "hang", [sys.executable, "-c", hang, str(pid_file)], budget_s=5),
           hc.Step("t", "fails", [sys.executable, "-c", "raise ValueError('boom')"], 60),
           hc.Step("t", "rows", [sys.executable, "-c", rows, "{out}"], 60)]
  done = []
  start = time.monotonic()
  hc.Runner(tmp_path, deadline=start + 60).run(steps, dict(os.environ), 2,
                                                lambda step, output: done.append(step.name))
  assert time.monotonic() - start < 30
  assert sorted(done) == ["fails", "hang", "rows"]
  hang_step, fails, ok = steps
  assert hang_step.status == "timeout" and "no result within 5 s" in hang_step.failure[0]
  for _ in range(50):
    if not _alive(int(pid_file.read_text())):
      break
    time.sleep(0.1)
  assert not _alive(int(pid_file.read_text())), "the hung step's child outlived it"
  assert fails.status == "failed" and fails.failure[-1] == "ValueError: boom"
  assert ok.status == "ok" and ok.rows == [{"x": 1}]

  late = hc.Step("t", "late", [sys.executable, "-c", "pass"], 60)
  hc.Runner(tmp_path, deadline=time.monotonic() + 1).run([late], dict(os.environ), 1,
                                                          lambda step, output: None)
  assert late.status == "skipped"


def test_pytest_counts_failures_and_all_skipped_on_a_device(tmp_path):
  """JUnit XML gives the counts and each failure's first line; on a GPU or TPU a file
  whose every test skipped fails (the chip went unrecognised)."""
  hc = _hardware_check()
  (tmp_path / "test_sample.py").write_text(
      "import pytest\n"
      "def test_ok(): pass\n"
      "def test_bad(): assert 1 == 2, 'kernel differs'\n"
      "def test_skip(): pytest.skip('needs a GPU kernel target')\n")
  (tmp_path / "test_skips.py").write_text(
      "import pytest\n"
      "def test_skip(): pytest.skip('needs a GPU kernel target; have cpu')\n")
  logs = {name: subprocess.run(
      [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"{name}.py",
       f"--junitxml={name}.xml"], cwd=tmp_path, capture_output=True, text=True, check=False).stdout
          for name in ("test_sample", "test_skips")}
  step = hc.Step("kernels", "sample", ["pytest"], 60, status="failed")
  hc.parse_junit(step, tmp_path / "test_sample.xml", "gpu", "")
  assert step.note == "1 passed, 1 failed, 1 skipped"
  assert step.failure == ["test_bad: AssertionError: kernel differs"]
  skips = hc.Step("kernels", "skips", ["pytest"], 60, status="ok")
  hc.parse_junit(skips, tmp_path / "test_skips.xml", "gpu", "")
  assert skips.status == "failed" and "have cpu" in skips.failure[0]
  on_cpu = hc.Step("kernels", "skips", ["pytest"], 60, status="ok")
  hc.parse_junit(on_cpu, tmp_path / "test_skips.xml", "cpu", "")
  assert on_cpu.status == "ok" and on_cpu.note == "1 skipped"
  killed = hc.Step("kernels", "killed", ["pytest"], 60, status="timeout")  # No XML: the log.
  hc.parse_junit(killed, tmp_path / "absent.xml", "gpu", logs["test_sample"])
  assert killed.note == "1 passed, 1 failed, 1 skipped (from the log)"
