"""The first command to run on a borrowed GPU or TPU: kernels, benchmarks, train throughput.

    python benchmarks/hardware_check.py --out=DIR           # H100/H200 or TPU: under 8 minutes
    python benchmarks/hardware_check.py --smoke --out=DIR   # every stage at tiny sizes, CPU
    python benchmarks/hardware_check.py --out=DIR --only=train,moe   # rerun some steps

On the device machine of this workplace (Python 3.12, no network) the
trainer's packages travel as wheels; README.md, "Hardware check", has the one
command that installs them and runs this.

Every step is a subprocess with its own time budget; one that fails, hangs or
overruns is killed with its process group and recorded, and the next starts. A
global deadline (--deadline) skips the steps that no longer fit, so the run
ends on time. Stages:

  kernels     each test file with gpu/tpu-marked tests, `pytest -m "gpu or tpu"`
              (compiled kernels against their references, forward and
              gradients: segments, windows, GQA, block-sparse maps, NSA), and
              each case of benchmarks/hardware_layer_check.py (the kernels as
              the layers call them, against the layers' XLA path). These check
              numerics only, so on a GPU they run at once, sharing its memory.
  benchmarks  attention.py (S = 8k, head_dim 128 rows), sparse_attention.py
              (S = 8k, with the NSA rows) and moe.py (its H100 shape).
  train       train_throughput.py: Llama 1B at seq 4096 with attention_impl
              xla, cudnn and pallas (pallas only on TPU), and the MoE config
              deepseek_v3_small cut to 4 layers; batch 4, so the XLA path's
              [t, s] scores and the f32 logits fit one GPU beside Adam.
Test files that gain gpu/tpu markers (new kernels) join the first stage by
themselves. --smoke runs the same steps at tiny sizes (kernels interpreted on
CPU; the hardware tests skip there) and is run by the test suite.

Writes three small files under --out (the device tool brings back at most 8),
rewritten after every step so a killed run keeps what finished:
  results.json  device, and per step: status (ok, failed, timeout, skipped),
                seconds, command, first lines of a failure, parsed rows
  summary.md    the same as markdown tables
  log.txt       every step's output
and prints a one-screen summary. Exit status 0 when every step is ok.
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

REPO = pathlib.Path(__file__).resolve().parent.parent
PY = sys.executable

# Seconds. The budgets are guesses for one H200 until it has run this: tune them from
# the seconds in results.json. Stage 1's steps run at once on a GPU, so its wall time
# is about one budget; the worst case of the rest is cut by the deadline.
DEADLINE_S = 450  # Whole run at real sizes (the wheel install and start come on top).
SMOKE_DEADLINE_S = 900
SMOKE_BUDGET_S = 300  # Each step in --smoke (a shared 2-core CPU).
MIN_START_S = 15  # A step is skipped when less than this is left before the deadline.
LOG_LINES = 400  # Lines of each step's output kept in log.txt (head and tail).

# Probe: what the children will run on, read by one small jax-only process.
PROBE = """import json, platform, sys, jax, jaxlib
d = jax.devices()
row = dict(platform=jax.default_backend(), device_kind=d[0].device_kind, devices=len(d),
           jax=jax.__version__, jaxlib=jaxlib.__version__, python=platform.python_version())
open(sys.argv[1], "a").write(json.dumps(row) + "\\n")"""
JAX_PLATFORMS = {"gpu": "cuda", "tpu": "tpu", "cpu": "cpu"}

# Stage 1: the cases of benchmarks/hardware_layer_check.py (its CASES; a test checks they match).
LAYER_CASES = ("attention_d64", "attention_d128", "attention_mha_d128", "nsa_d64", "nsa_d128")
SMOKE_LAYER_CASES = ("attention_d64", "nsa_d64")
KERNEL_BUDGET_S = 150

# Stage 2: name, script, flags at real sizes, flags in --smoke, budget (s).
BENCHMARKS = (
    ("attention", "benchmarks/attention.py", ["--only=S8192 H16 D128", "--iters=10"],
     ["--smoke", "--only=win64"], 60),
    ("sparse_attention", "benchmarks/sparse_attention.py", ["--nsa", "--only=S8192", "--iters=10"],
     ["--smoke", "--nsa", "--only=window,nsa core xla"], 75),
    ("moe", "benchmarks/moe.py", ["--iters=5", "--warmup=1"], ["--smoke", "--iters=2"], 30),
    # Treadle's side alone where torch/diffusers are absent (the borrowed GPU).
    ("diffusion", "benchmarks/diffusion.py",
     ["--model=ddpm_cifar10", "--sizes=32", "--batch=64", "--steps=5", "--repeats=3",
      "--dtype=bfloat16"], ["--smoke"], 90),
    # SSD (xla and the Pallas kernel) vs flash attention by length; WKV-7 likewise.
    ("ssm", "benchmarks/ssm.py", ["--lengths=2048,8192,32768", "--iters=5"],
     ["--smoke", "--mixer=false", "--passes=fwd", "--impls=ssd,attention"], 90),
    ("rwkv7", "benchmarks/rwkv7.py", ["--lengths=4096,16384", "--iters=10"],
     ["--smoke", "--model_bench=off", "--chunk_sizes=16"], 90),
)

# Stage 3: benchmarks/train_throughput.py runs.
LLAMA = ["--config=configs/llama.py:size=1b,seq_len=4096,batch=4"]
MOE = ["--config=configs/moe.py:size=deepseek_v3_small,seq_len=4096,batch=4",
       "--config.model.num_layers=4"]
TRAIN_FLAGS = ["--steps=5", "--warmup=2"]
SMOKE_LLAMA = ["--config=configs/llama_tiny.py"]
SMOKE_MOE = ["--config=configs/moe_tiny.py"]
# The recurrent families at their published shapes; model.ssm_impl / rwkv_impl 'auto' pick
# the Pallas kernels on a GPU/TPU (one run each: the xla paths are in the benchmarks stage).
RECURRENT = {"mamba2 370m": ["--config=configs/mamba.py:size=370m,seq_len=4096,batch=4"],
             "rwkv7 0.4b": ["--config=configs/rwkv.py:size=0.4b,seq_len=4096,batch=4"]}
SMOKE_RECURRENT = {"mamba_tiny": ["--config=configs/mamba_tiny.py"],
                   "rwkv_tiny": ["--config=configs/rwkv_tiny.py"]}
SMOKE_TRAIN_FLAGS = ["--config.model.num_layers=1", "--config.data.global_batch_size=2",
                     "--config.data.seq_len=64", "--steps=1", "--warmup=1", "--matmul_size=128"]
TRAIN_BUDGET_S = 60
TRAIN_IMPLS = {"gpu": ("xla", "cudnn", "pallas"), "tpu": ("pallas",), "cpu": ("xla", "pallas")}


@dataclasses.dataclass
class Step:
  """One subprocess and, once run, its outcome."""
  stage: str
  name: str
  argv: list[str]  # '{out}' is replaced by a scratch file: JSON lines, or pytest's JUnit XML.
  budget_s: float
  status: str = "pending"  # ok | failed | timeout | skipped
  seconds: float = 0.0
  returncode: int | None = None
  note: str = ""
  failure: list[str] = dataclasses.field(default_factory=list)
  rows: list[dict] = dataclasses.field(default_factory=list)

  @property
  def label(self) -> str:
    return f"{self.stage}/{self.name}"

  @property
  def is_pytest(self) -> bool:
    return "pytest" in self.argv


def hardware_test_files() -> list[pathlib.Path]:
  """Test files holding gpu- or tpu-marked tests, wherever they sit under tests/."""
  marked = re.compile(r"pytest\.mark\.(gpu|tpu)\b")
  return sorted(p for p in (REPO / "tests").rglob("test_*.py") if marked.search(p.read_text()))


def plan(platform: str, smoke: bool) -> list[Step]:
  """Every step of stages 1-3 for `platform` ('gpu', 'tpu' or 'cpu')."""
  steps = []
  budget = lambda seconds: SMOKE_BUDGET_S if smoke else seconds  # noqa: E731
  for path in hardware_test_files():
    name = path.stem  # Test file names are unique across tests/.
    # -v names each test as it starts: the log shows which one a timeout stopped.
    steps.append(Step("kernels", name, [PY, "-m", "pytest", "-v", "-n", "0", "-m", "gpu or tpu",
                                        str(path.relative_to(REPO)), "--junitxml={out}"],
                      budget(KERNEL_BUDGET_S)))
  for case in SMOKE_LAYER_CASES if smoke else LAYER_CASES:
    steps.append(Step("kernels", f"layers {case}",
                      [PY, "benchmarks/hardware_layer_check.py", f"--case={case}",
                       "--json={out}"] + (["--smoke"] if smoke else []),
                      budget(KERNEL_BUDGET_S)))
  for name, script, flags, smoke_flags, seconds in BENCHMARKS:
    steps.append(Step("benchmarks", name, [PY, script, "--json={out}"]
                      + (smoke_flags if smoke else flags), budget(seconds)))
  throughput = [PY, "benchmarks/train_throughput.py", "--json={out}"]
  train_flags = SMOKE_TRAIN_FLAGS if smoke else TRAIN_FLAGS
  llama_name = "llama_tiny" if smoke else "llama 1b"
  for impl in TRAIN_IMPLS.get(platform, TRAIN_IMPLS["gpu"]):
    steps.append(Step("train", f"{llama_name} {impl}",
                      throughput + (SMOKE_LLAMA if smoke else LLAMA)
                      + [f"--config.model.attention_impl={impl}"] + train_flags,
                      budget(TRAIN_BUDGET_S)))
  steps.append(Step("train", "moe_tiny" if smoke else "moe deepseek_v3_small 4 layers",
                    throughput + (SMOKE_MOE if smoke else MOE) + train_flags,
                    budget(TRAIN_BUDGET_S)))
  for name, flags in (SMOKE_RECURRENT if smoke else RECURRENT).items():
    steps.append(Step("train", name, throughput + flags + train_flags, budget(TRAIN_BUDGET_S)))
  return steps


def workers(stage: str, platform: str) -> int:
  """How many steps of `stage` run at once: timed stages one at a time on an accelerator;
  a TPU is owned by one process; the kernels' numerics share a GPU."""
  if platform == "cpu":
    return 2
  return 8 if stage == "kernels" and platform == "gpu" else 1


def base_env(platform: str | None, smoke: bool) -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  if platform in JAX_PLATFORMS and "JAX_PLATFORMS" not in os.environ:
    env["JAX_PLATFORMS"] = JAX_PLATFORMS[platform]  # tests/conftest.py would pick the CPU.
  if smoke and platform == "cpu":  # Tiny programs: XLA's optimizations cost more than they save.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  return env


class Runner:
  """Runs steps as process groups under budgets and a global deadline."""

  def __init__(self, work: pathlib.Path, deadline: float):
    self.work, self.deadline, self.platform = work, deadline, "unknown"
    self.running = []  # (step, Popen, start, timeout, scratch path, log path)

  def run(self, steps: list[Step], env: dict, parallel: int, on_done) -> None:
    pending = list(steps)
    while pending or self.running:
      while pending and len(self.running) < parallel:
        step = pending.pop(0)
        left = self.deadline - time.monotonic()
        if left < MIN_START_S:
          step.status, step.note = "skipped", f"global deadline: under {MIN_START_S} s left"
          on_done(step, "")
          continue
        self._start(step, env, min(step.budget_s, left))
      time.sleep(0.2)
      for entry in list(self.running):
        step, proc, start, timeout, _, _ = entry
        if proc.poll() is None and time.monotonic() - start < timeout:
          continue
        timed_out = proc.poll() is None
        if timed_out:
          self._kill(proc)
        self.running.remove(entry)
        on_done(step, self._finish(entry, timed_out))

  def _start(self, step: Step, env: dict, timeout: float) -> None:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", step.label)
    scratch = self.work / (slug + (".xml" if step.is_pytest else ".jsonl"))
    log = self.work / (slug + ".log")
    argv = [arg.replace("{out}", str(scratch)) for arg in step.argv]
    with open(log, "w", encoding="utf-8") as f:
      # A new process group (not session): killable as a whole, and still ended with this run.
      proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                              process_group=0)
    self.running.append((step, proc, time.monotonic(), timeout, scratch, log))

  @staticmethod
  def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's process group, then SIGKILL to whatever is left of it."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
      try:
        os.killpg(proc.pid, sig)
      except ProcessLookupError:
        return
      try:
        proc.wait(timeout=wait)
      except subprocess.TimeoutExpired:
        pass

  def kill_all(self) -> None:
    for step, proc, start, _, _, _ in self.running:
      self._kill(proc)
      step.status, step.seconds, step.note = "timeout", time.monotonic() - start, "run interrupted"
    self.running = []

  def _finish(self, entry, timed_out: bool) -> str:
    """Fills in the step's outcome; returns its (trimmed) output."""
    step, proc, start, timeout, scratch, log = entry
    step.seconds, step.returncode = time.monotonic() - start, proc.returncode
    output = log.read_text(encoding="utf-8", errors="replace")
    lines = [line.rstrip()[:200] for line in output.splitlines() if line.strip()]
    step.status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    if step.is_pytest:
      parse_junit(step, scratch, self.platform, output)
    else:
      step.rows = read_rows(scratch)
      step.note = note_for(step)
      if step.status == "ok" and not step.rows:
        step.status, step.failure = "failed", ["exited 0 but wrote no rows (--json)"]
    if timed_out:
      step.failure = [f"no result within {timeout:.0f} s; last output:"] + lines[-2:]
    elif step.status == "failed" and not step.failure:
      step.failure = error_lines(lines)
    return trim(output)


def read_rows(path: pathlib.Path) -> list[dict]:
  """The rows a step wrote: one JSON document {"rows": [...], ...} (the benchmarks that
  write at the end), or JSON lines (a line cut short by a kill is dropped)."""
  text = path.read_text() if path.exists() else ""
  try:
    whole = json.loads(text)
  except json.JSONDecodeError:
    whole = None
  if isinstance(whole, dict) and isinstance(whole.get("rows"), list):
    return [row for row in whole["rows"] if isinstance(row, dict)]
  rows = []
  for line in text.splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict):
      rows.append(row)
  return rows


def error_lines(lines: list[str]) -> list[str]:
  """The last Python exception line and the two after it, else the last three lines."""
  for i in range(len(lines) - 1, -1, -1):
    if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", lines[i]):
      return lines[i:i + 3]
  return lines[-3:]


def parse_junit(step: Step, path: pathlib.Path, platform: str, output: str) -> None:
  """Counts and failures of a pytest step from its JUnit XML, which pytest writes at its
  end: a killed or crashed run has only its -v log, whose outcome words are counted."""
  counts, skip_reason = dict(passed=0, failed=0, skipped=0), ""
  try:
    cases = list(ElementTree.parse(path).getroot().iter("testcase"))
  except (OSError, ElementTree.ParseError):
    for outcome in re.findall(r"::\S+ (PASSED|FAILED|ERROR|SKIPPED)", output):
      counts[{"PASSED": "passed", "SKIPPED": "skipped"}.get(outcome, "failed")] += 1
    step.note = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) + " (from the log)"
    step.rows = [dict(counts, skip_reason="")]
    return
  for case in cases:
    bad = next((c for c in case if c.tag in ("failure", "error")), None)
    skipped = case.find("skipped")
    if bad is not None:
      counts["failed"] += 1
      message = (bad.get("message") or bad.text or "").strip().splitlines() or ["(no message)"]
      step.failure.append(f"{case.get('name')}: {message[0][:200]}")
    elif skipped is not None:
      counts["skipped"] += 1
      message = skipped.get("message") or skip_reason
      skip_reason = message.splitlines()[0][:160] if message else ""
    else:
      counts["passed"] += 1
  step.note = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) or "no tests"
  step.rows = [dict(counts, skip_reason=skip_reason)]
  if step.status == "ok" and counts["passed"] == 0 and platform != "cpu":
    step.status = "failed"  # On the accelerator every test skipped: the chip went unrecognised.
    step.failure = [f"no test ran on this device; skip reason: {skip_reason}"]


def note_for(step: Step) -> str:
  """A few words on a step's rows for the summary table."""
  rows = step.rows
  if not rows:
    return ""
  if step.stage == "probe":
    row = rows[0]
    return f"{row['device_kind']} x{row['devices']}, jax {row['jax']}, python {row['python']}"
  if step.name.startswith("layers"):
    row = rows[-1]
    return (f"{'ok' if row['ok'] else 'MISMATCH'}: worst {row['worst']} "
            f"(rel max {row['worst_rel_max']:.1e}, rel norm {row['max_rel_norm']:.1e})")
  if step.stage == "train":
    row = rows[-1]
    mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") else ""
    return f"{row['tokens_per_s']:,.0f} tokens/s, step {row['step_ms']:.0f} ms{mfu}"
  return f"{len(rows)} rows"


def trim(text: str) -> str:
  lines = text.splitlines()
  if len(lines) <= LOG_LINES:
    return text
  head, tail = LOG_LINES // 4, LOG_LINES - LOG_LINES // 4
  return "\n".join(lines[:head] + [f"[... {len(lines) - LOG_LINES} lines cut ...]"]
                   + lines[-tail:])


def fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return "" if value is None else str(value)


def markdown(report: dict, steps: list[Step]) -> str:
  device = report["device"]
  lines = ["# Hardware check", "",
           f"{device.get('device_kind', '?')} x{device.get('devices', '?')} "
           f"({device.get('platform', '?')}), jax {device.get('jax', '?')}, python "
           f"{device.get('python', '?')}; {report['started']}; {report['seconds']:.0f} s of a "
           f"{report['deadline_s']} s deadline{'; smoke' if report['smoke'] else ''}", "",
           "| stage | step | status | s | notes |", "|---|---|---|---:|---|"]
  lines += [f"| {s.stage} | {s.name} | {s.status} | {s.seconds:.0f} | {s.note} |" for s in steps]
  bad = [s for s in steps if s.failure]
  if bad:
    lines += ["", "## Failures", ""]
    for s in bad:
      lines += [f"**{s.label}** ({s.status})", "", "```"] + s.failure[:8] + ["```", ""]
  for s in steps:
    if s.rows and not s.is_pytest and s.stage != "probe":
      keys = list(dict.fromkeys(k for row in s.rows for k in row))
      lines += ["", f"## {s.label}", "", "| " + " | ".join(keys) + " |",
                "|" + "---|" * len(keys)]
      lines += ["| " + " | ".join(fmt(row.get(k)) for k in keys) + " |" for row in s.rows]
  return "\n".join(lines) + "\n"


def screen(report: dict, steps: list[Step], out: pathlib.Path) -> str:
  """The one-screen summary printed at the end."""
  device = report["device"]
  lines = [f"hardware check: {device.get('device_kind', '?')} ({device.get('platform', '?')}), "
           f"jax {device.get('jax', '?')}: {report['seconds']:.0f} s", ""]
  lines += [f"{s.stage:10s} {s.name[:34]:34s} {s.status:8s} {s.seconds:5.0f}s  {s.note[:60]}"
            for s in steps]
  for s in (s for s in steps if s.failure):
    lines += ["", f"{s.label} ({s.status}):"] + [f"  {line}" for line in s.failure[:4]]
  ok = sum(s.status == "ok" for s in steps)
  lines += ["", f"{ok}/{len(steps)} steps ok; wrote {out}/results.json, summary.md, log.txt"]
  return "\n".join(lines)


class Report:
  """results.json, summary.md and log.txt under `out`, rewritten after every step."""

  def __init__(self, out: pathlib.Path, smoke: bool, deadline_s: float):
    self.out, self.start, self.steps = out, time.monotonic(), []
    self.info = dict(device={}, smoke=smoke, deadline_s=deadline_s, seconds=0.0,
                     started=datetime.datetime.now().isoformat(timespec="seconds"))
    (out / "log.txt").write_text("")

  def step_done(self, step: Step, output: str) -> None:
    with open(self.out / "log.txt", "a", encoding="utf-8") as f:
      f.write(f"===== {step.label}: {step.status} ({step.seconds:.0f} s)\n"
              f"$ {shlex.join(step.argv)}\n{output}\n")
    self.save()
    print(f"[{self.info['seconds']:4.0f}s] {step.label}: {step.status} {step.note}", flush=True)

  def save(self) -> None:
    self.info["seconds"] = time.monotonic() - self.start
    steps = [dict(dataclasses.asdict(s), argv=shlex.join(s.argv)) for s in self.steps]
    (self.out / "results.json").write_text(json.dumps(dict(self.info, steps=steps), indent=1))
    (self.out / "summary.md").write_text(markdown(self.info, self.steps))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder for results.json, summary.md, log.txt")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CPU (and the tests)")
  parser.add_argument("--only", default="",
                      help="run only the steps whose stage/name holds one of these "
                           "comma-separated substrings (e.g. train,layers)")
  parser.add_argument("--deadline", type=float, default=None,
                      help=f"seconds for the whole run (default {DEADLINE_S}, smoke "
                           f"{SMOKE_DEADLINE_S})")
  args = parser.parse_args()
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  deadline_s = args.deadline or (SMOKE_DEADLINE_S if args.smoke else DEADLINE_S)
  report = Report(out, args.smoke, deadline_s)
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # Unwinds through the cleanup below.
  with tempfile.TemporaryDirectory(prefix="hardware_check_") as work:
    runner = Runner(pathlib.Path(work), report.start + deadline_s)
    try:
      probe = Step("probe", "jax devices", [PY, "-c", PROBE, "{out}"], 60)
      report.steps.append(probe)
      runner.run([probe], base_env(None, args.smoke), 1, report.step_done)
      report.info["device"] = probe.rows[0] if probe.rows else {}
      platform = runner.platform = report.info["device"].get("platform", "unknown")
      if platform == "cpu" and not args.smoke:
        print("No GPU or TPU here: --smoke runs the tiny sizes on CPU.")
        return 2
      selected = [s for s in plan(platform, args.smoke)
                  if not args.only or any(part in s.label for part in args.only.split(","))]
      report.steps += selected
      env = base_env(platform, args.smoke)
      for stage in ("kernels", "benchmarks", "train"):
        stage_steps = [s for s in selected if s.stage == stage]
        parallel = min(workers(stage, platform), max(len(stage_steps), 1))
        stage_env = dict(env)
        if platform == "gpu" and parallel > 1:  # The processes share the GPU's memory.
          stage_env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false",
                           XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / parallel:.2f}")
        runner.run(stage_steps, stage_env, parallel, report.step_done)
    finally:
      runner.kill_all()
      report.save()
  print("\n" + screen(report.info, report.steps, out))
  return 0 if all(s.status == "ok" for s in report.steps) else 1


if __name__ == "__main__":
  sys.exit(main())
