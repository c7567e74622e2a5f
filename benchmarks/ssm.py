r"""Mamba-2's SSD against a sequential scan and against causal attention, one device, one run.

  python benchmarks/ssm.py                        # CPU: 256-8k tokens; GPU/TPU: 512-64k
  python benchmarks/ssm.py --lengths=2048,8192 --passes=fwd+bwd --json=/tmp/ssm.json
  python benchmarks/ssm.py --smoke                # tiny shapes: checks the script runs

1. Sequence mixers at the same width: h heads of head dim d, one call over
   `--tokens` tokens (batch = tokens / length, at least 1; so SSD's cost stays
   flat over lengths while attention's grows with the length).
   - `ssd`: layers/ssm/ssd.py's chunked SSD (plain jnp through XLA), state N,
     one B/C group, `--chunk_size`;
   - `scan`: the same recurrence token by token, a `lax.scan` written here
     (S_t = exp(dt_t·A)·S_{t-1} + dt_t·x_t ⊗ B_t, y_t = S_t·C_t + D·x_t), skipped
     above `--scan_max_length` (its backward keeps a state per token);
   - `ssd_pallas` (on a chip a kernel targets): the Pallas SSD kernels; on a
     Hopper GPU the Mosaic GPU kernels (float32 takes the Triton backward), and
     `ssd_pallas_triton` the Triton kernels both ways, so one run times both GPU kernels;
   - `attention`: causal multi-head attention through layers/attention's
     implementation switch (`--attention_impl`, default auto: the query-blocked
     XLA path on CPU, cuDNN flash attention on a GPU, the Pallas kernel on a TPU).
   Forward and forward+backward (gradients of every input against a fixed random
   cotangent). Reported: the median time of a call, and for each SSM the
   crossover length, the shortest measured length from which on it is faster than
   attention. More SSM implementations (a Pallas SSD) are one more entry in
   `IMPLS` with the signature of `layers.ssm.ssd`.
2. On CPU only, the whole Mamba-2 layer: Treadle's `layers.ssm.Mamba2Mixer`
   (jitted) against transformers' `Mamba2Mixer` (eager; without mamba_ssm its
   forward runs the pure-torch chunked path, the old `torch_forward`), random
   weights of the same shape (e = h·d/2, expand 2), forward and
   forward+backward (gradients of the input and every weight), `--mixer_tokens`
   tokens. As benchmarks/cpu_vs_torch.py: warmup, then `--repeats` alternating
   blocks; the ratio torch time / Treadle time (> 1: Treadle faster) of the
   medians and of the fastest blocks (on a shared machine only the latter means much).

CPU threads: `--cpu_threads` (default 2) pins this process to that many cores
before XLA starts (XLA:CPU sizes its thread pool from the cores it may use) and
gives torch as many threads; 0 leaves both at every core. Not applied when an
accelerator plugin is installed. float32 on CPU, bfloat16 elsewhere (`--dtype`);
SSM states are float32 either way. Timing: random inputs, `--warmup` untimed
calls (compilation), then the median of `--iters` calls, each synchronised.
"""

import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import pkgutil
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from layers.attention import implementations as attention_lib
from layers.ssm import Mamba2Mixer
from layers.ssm import ssd
from pallas_kernels.common.config import CHIPS, chip_of_device

_LENGTHS = flags.DEFINE_list("lengths", [], "Sequence lengths (default: 256-8192 on CPU, "
                             "512-65536 elsewhere).")
_TOKENS = flags.DEFINE_integer("tokens", 0, "Tokens per call, batch = tokens / length (default: "
                               "8192 on CPU, 65536 elsewhere).")
_HEADS = flags.DEFINE_integer("heads", 0, "h (default: 8 on CPU, 24 elsewhere).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "d, of the SSM heads and the attention heads.")
_STATE = flags.DEFINE_integer("state_size", 0, "N (default: 64 on CPU, 128 elsewhere).")
_CHUNK = flags.DEFINE_integer("chunk_size", 0, "SSD chunk length (default: 128 on CPU, 256 "
                              "elsewhere).")
_IMPLS = flags.DEFINE_list("impls", [], "Rows to time (keys of IMPLS); empty: ssd, scan and "
                           "attention, and ssd_pallas on a GPU/TPU the kernel targets (on a "
                           "GPU also ssd_pallas_triton: ssd_pallas is the Mosaic GPU kernel).")
_ATTENTION_IMPL = flags.DEFINE_enum("attention_impl", "auto", list(attention_lib.IMPLEMENTATIONS),
                                    "layers/attention implementation of the attention row.")
_PASSES = flags.DEFINE_list("passes", ["fwd", "fwd+bwd"], "fwd and/or fwd+bwd.")
_SCAN_MAX = flags.DEFINE_integer("scan_max_length", 16384, "Longest length the scan row runs.")
_DTYPE = flags.DEFINE_string("dtype", "", "Input dtype (default: float32 on CPU, else bfloat16).")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed calls per row (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls per row first.")
_MIXER = flags.DEFINE_bool("mixer", True, "On CPU, also Treadle vs transformers' Mamba2Mixer.")
_MIXER_TOKENS = flags.DEFINE_integer("mixer_tokens", 2048, "Tokens of the mixer comparison "
                                     "(one row).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Mixer comparison: alternating blocks per side.")
_CPU_THREADS = flags.DEFINE_integer("cpu_threads", 2, "On CPU: cores for XLA and torch threads "
                                    "(0: all).")
_JSON = flags.DEFINE_string("json", "", "Also write the numbers to this JSON file.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Lengths 64 and 128, h 2, d 16, N 16, chunk 32, one "
                           "call each: checks the script runs.")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One length: batch x seq tokens, h heads of d, SSM state N, SSD chunk."""
  batch: int
  seq: int
  heads: int
  head_dim: int
  state: int
  chunk: int
  dtype: str


def sequential_scan(x, dt, a, bmat, cmat, d_skip, *, chunk_size=None):
  """The SSD recurrence one token at a time (a `lax.scan`), float32 state.

  Args as `layers.ssm.ssd` (x [b, t, h, d], dt [b, t, h], a [h], bmat/cmat
  [b, t, ng, N], d_skip [h]); chunk_size is ignored. Returns (y [b, t, h, d] in
  x.dtype, final state float32 [b, h, d, N]).
  """
  del chunk_size
  b, t, h, d = x.shape
  ng, n = bmat.shape[2:]
  state0 = jnp.zeros((b, ng, h // ng, d, n), jnp.float32)

  def step(state, inputs):
    x_t, dt_t, b_t, c_t = inputs  # [b, h, d], [b, h], [b, ng, N], [b, ng, N]
    x_t = x_t.astype(jnp.float32).reshape(b, ng, h // ng, d)
    dt_t = dt_t.astype(jnp.float32).reshape(b, ng, h // ng)
    decay = jnp.exp(dt_t * a.astype(jnp.float32).reshape(ng, h // ng))
    state = (state * decay[..., None, None]
             + jnp.einsum("bgjd,bgn->bgjdn", x_t * dt_t[..., None], b_t.astype(jnp.float32)))
    y = jnp.einsum("bgjdn,bgn->bgjd", state, c_t.astype(jnp.float32))
    y = y + x_t * d_skip.astype(jnp.float32).reshape(ng, h // ng)[..., None]
    return state, y.reshape(b, h, d).astype(x.dtype)

  inputs = [jnp.moveaxis(z, 1, 0) for z in (x, dt, bmat, cmat)]
  state, ys = jax.lax.scan(step, state0, inputs)
  return jnp.moveaxis(ys, 0, 1), state.reshape(b, h, d, n)


@dataclasses.dataclass(frozen=True)
class Impl:
  """A benchmark row: `kind` 'ssm' (takes ssd's inputs) or 'attention' (q, k, v);
  `build(problem)` returns the function to time, inputs -> [b, t, h, d]."""
  kind: str
  build: Callable[[Problem], Callable[..., jax.Array]]
  max_length: Callable[[], int] = lambda: 1 << 30


def _ssm_row(scan_fn) -> Callable[[Problem], Callable[..., jax.Array]]:
  return lambda p: lambda *inputs: scan_fn(*inputs, chunk_size=p.chunk)[0]


def attention_impl(p: Problem) -> str:
  """The concrete layers/attention implementation `--attention_impl` means for `p`."""
  return attention_lib.resolve_impl(_ATTENTION_IMPL.value, backend=attention_lib.default_backend(),
                                    dtype=p.dtype, head_dim=p.head_dim)


def _attention_row(p: Problem) -> Callable[..., jax.Array]:
  return functools.partial(attention_lib.dot_product_attention, impl=attention_impl(p))


def pallas_ssd(*inputs, chunk_size: int, gpu_kernel: str = "mosaic"):
  """The Pallas SSD kernel for this machine's chip (interpreted on CPU: slow).

  On a GPU, gpu_kernel picks the kernels: 'mosaic' (Mosaic GPU; float32 inputs
  take the Triton backward) or 'triton' (Triton both ways); TPUs ignore it.
  """
  chip = chip_of_device(jax.devices()[0]) or ""
  return ssd(*inputs, chunk_size=chunk_size, impl="pallas", chip=chip, gpu_kernel=gpu_kernel)


# Name -> row; an SSD implementation is one more 'ssm' entry.
IMPLS = {
    "ssd": Impl("ssm", _ssm_row(ssd)),
    "ssd_pallas": Impl("ssm", _ssm_row(pallas_ssd)),
    "ssd_pallas_triton": Impl("ssm", _ssm_row(functools.partial(pallas_ssd,
                                                                gpu_kernel="triton"))),
    "scan": Impl("ssm", _ssm_row(sequential_scan), max_length=lambda: _SCAN_MAX.value),
    "attention": Impl("attention", _attention_row),
}


def ssm_inputs(p: Problem, key) -> tuple[jax.Array, ...]:
  """x, dt, a, bmat, cmat, d_skip as a Mamba-2 layer feeds them (dt log-uniform in
  [1e-3, 0.1], A in [-16, -1])."""
  kx, kdt, ka, kb, kc = jax.random.split(key, 5)
  b, t, h, d, n = p.batch, p.seq, p.heads, p.head_dim, p.state
  x = jax.random.normal(kx, (b, t, h, d), p.dtype)
  dt = jnp.exp(jax.random.uniform(kdt, (b, t, h), jnp.float32, np.log(1e-3), np.log(1e-1)))
  a = -jax.random.uniform(ka, (h,), jnp.float32, 1.0, 16.0)
  bmat = jax.random.normal(kb, (b, t, 1, n), p.dtype)
  cmat = jax.random.normal(kc, (b, t, 1, n), p.dtype) / np.sqrt(n)
  return x, dt, a, bmat, cmat, jnp.ones((h,), jnp.float32)


def attention_inputs(p: Problem, key) -> tuple[jax.Array, ...]:
  """q, k, v [b, t, h, d]."""
  return tuple(jax.random.normal(k, (p.batch, p.seq, p.heads, p.head_dim), p.dtype)
               for k in jax.random.split(key, 3))


def timed_fns(fn, inputs) -> dict[str, Callable[[], object]]:
  """'fwd' and 'fwd+bwd' calls of `fn` on `inputs` (jitted; the latter returns every
  input's gradient against a fixed random cotangent)."""
  forward = jax.jit(fn)
  dy = jax.random.normal(jax.random.key(7), jax.eval_shape(fn, *inputs).shape,
                         inputs[0].dtype)

  @jax.jit
  def forward_backward(*args):
    _, pullback = jax.vjp(fn, *args)
    return pullback(dy)

  return {"fwd": lambda: forward(*inputs), "fwd+bwd": lambda: forward_backward(*inputs)}


def median_seconds(call, iters: int, warmup: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_sequence_mixers(problems: list[Problem], impls: list[str], passes: list[str],
                          iters: int, warmup: int) -> list[dict]:
  """One JSON row per (problem, impl, pass): seconds per call, or the reason it has none."""
  rows = []
  for p in problems:
    for name in impls:
      impl = IMPLS[name]
      make = ssm_inputs if impl.kind == "ssm" else attention_inputs
      row_base = dict(dataclasses.asdict(p), impl=name)
      if impl.kind == "attention":
        row_base["attention_impl"] = attention_impl(p)
      if p.seq > impl.max_length():
        rows += [dict(row_base, **{"pass": k}, seconds=None, skipped="longer than its max length")
                 for k in passes]
        continue
      calls = timed_fns(impl.build(p), make(p, jax.random.key(p.seq)))
      for kind in passes:
        row = dict(row_base, **{"pass": kind})
        try:
          row["seconds"] = median_seconds(calls[kind], iters, warmup)
        except Exception as error:  # pylint: disable=broad-except  (out of memory at 64k)
          row["seconds"], row["skipped"] = None, f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(row)
        print(f"  t={p.seq:6d} b={p.batch:3d} {name:10s} {kind:8s} "
              + (f"{row['seconds'] * 1e3:10.2f} ms" if row["seconds"] else row["skipped"]),
              flush=True)
  return rows


def crossover(rows: list[dict], ssm: str, kind: str) -> str:
  """Where `ssm` gets faster than attention for good (the shortest length from which on it
  is faster at every measured length), in words."""
  pairs = {}
  for row in rows:
    if row["pass"] == kind and row["seconds"] and row["impl"] in (ssm, "attention"):
      pairs.setdefault(row["seq"], {})[row["impl"]] = row["seconds"]
  lengths = sorted(t for t, v in pairs.items() if len(v) == 2)
  if not lengths:
    return "not measured"
  faster = [pairs[t][ssm] < pairs[t]["attention"] for t in lengths]
  if not faster[-1]:
    return f"at no length for good (up to t = {lengths[-1]})"
  first = len(faster)
  while first > 0 and faster[first - 1]:
    first -= 1
  if first == 0:
    return f"at every measured length (t >= {lengths[0]})"
  return f"from t = {lengths[first]} on (slower at {lengths[first - 1]})"


def markdown(rows: list[dict], impls: list[str], passes: list[str]) -> tuple[str, dict]:
  """A table of ms per call (lengths x impls) per pass, and the crossovers."""
  names = [n if n != "attention" else f"attention ({_attention_label(rows)})" for n in impls]
  lines, crossovers = [], {}
  ssms = [n for n in impls if IMPLS[n].kind == "ssm"]
  for kind in passes:
    lines += [f"\n{kind}, ms per call", "",
              "| t | batch | " + " | ".join(names) + (" | attention / ssd |"
                                                       if "ssd" in ssms and "attention" in impls
                                                       else " |"),
              "|---" * (len(names) + 2 + int("ssd" in ssms and "attention" in impls)) + "|"]
    for seq in sorted({r["seq"] for r in rows}):
      cells = {r["impl"]: r for r in rows if r["seq"] == seq and r["pass"] == kind}
      shown = [f"{cells[n]['seconds'] * 1e3:.2f}" if cells[n]["seconds"] else "—" for n in impls]
      line = f"| {seq} | {cells[impls[0]]['batch']} | " + " | ".join(shown) + " |"
      if "ssd" in ssms and "attention" in impls:
        s, a = cells["ssd"]["seconds"], cells["attention"]["seconds"]
        line += f" {a / s:.2f}x |" if s and a else " — |"
      lines.append(line)
    if "attention" in impls:
      for ssm in ssms:
        crossovers[f"{ssm} {kind}"] = crossover(rows, ssm, kind)
        lines.append(f"\n{ssm} is faster than attention ({kind}) {crossovers[f'{ssm} {kind}']}")
  return "\n".join(lines), crossovers


def _attention_label(rows: list[dict]) -> str:
  return next((r["attention_impl"] for r in rows if "attention_impl" in r), "")


class TreadleLayer:
  """layers.ssm.Mamba2Mixer, jitted forward and forward+backward on one fixed input."""

  def __init__(self, p: Problem, embed: int):
    self.model = Mamba2Mixer(embed, p.heads, p.head_dim, p.state, chunk_size=p.chunk,
                             dtype=jnp.dtype(p.dtype))
    self.x = jax.random.normal(jax.random.key(0), (p.batch, p.seq, embed), p.dtype)
    self.params = jax.jit(self.model.init)(jax.random.key(1), self.x)["params"]
    dy = jax.random.normal(jax.random.key(2), self.x.shape, p.dtype)
    self.forward = jax.jit(lambda params, x: self.model.apply({"params": params}, x))
    self.forward_backward = jax.jit(jax.grad(
        lambda params, x: jnp.vdot(self.model.apply({"params": params}, x), dy), argnums=(0, 1)))

  def run(self, kind: str, calls: int) -> None:
    fn = self.forward if kind == "fwd" else self.forward_backward
    for _ in range(calls):
      out = fn(self.params, self.x)
    jax.block_until_ready(out)


class TorchLayer:
  """transformers' Mamba2Mixer of the same shape, eager, pure-torch path (no mamba_ssm)."""

  def __init__(self, p: Problem, embed: int):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch = torch
    config = transformers.Mamba2Config(
        hidden_size=embed, num_heads=p.heads, head_dim=p.head_dim,
        expand=p.heads * p.head_dim // embed, state_size=p.state, n_groups=1, conv_kernel=4,
        chunk_size=p.chunk, use_bias=False, use_conv_bias=True, num_hidden_layers=1,
        layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    self.model = transformers.models.mamba2.modeling_mamba2.Mamba2Mixer(config, layer_idx=0)
    self.model.train()
    self.x = torch.randn(p.batch, p.seq, embed, requires_grad=True)
    self.dy = torch.randn(p.batch, p.seq, embed)

  def run(self, kind: str, calls: int) -> None:
    for _ in range(calls):
      if kind == "fwd":
        with self.torch.no_grad():
          self.model(self.x)
      else:
        self.model.zero_grad(set_to_none=True)
        self.x.grad = None
        (self.model(self.x) * self.dy).sum().backward()


def bench_layer(p: Problem, passes: list[str], repeats: int, warmup: int) -> list[dict]:
  """Treadle's Mamba2Mixer vs transformers', alternating blocks of one call; JSON rows."""
  embed = p.heads * p.head_dim // 2
  sides = {"treadle": TreadleLayer(p, embed), "torch": TorchLayer(p, embed)}
  print(f"\nMamba-2 layer: e {embed}, h {p.heads}, d {p.head_dim}, N {p.state}, chunk "
        f"{p.chunk}, {p.batch} x {p.seq} tokens, {p.dtype}")
  rows = []
  for kind in passes:
    for side in sides.values():
      side.run(kind, warmup)
    times = {name: [] for name in sides}
    for _ in range(repeats):
      for name, side in sides.items():
        start = time.perf_counter()
        side.run(kind, 1)
        times[name].append(time.perf_counter() - start)
    row = {"what": f"Mamba2Mixer {kind}", "embed": embed, **dataclasses.asdict(p)}
    for name, t in times.items():
      row[f"{name}_seconds"], row[f"{name}_fastest_seconds"] = statistics.median(t), min(t)
    row["ratio_median"] = row["torch_seconds"] / row["treadle_seconds"]
    row["ratio_fastest"] = row["torch_fastest_seconds"] / row["treadle_fastest_seconds"]
    rows.append(row)
  print("\n| Mamba2Mixer | Treadle ms | torch ms | torch / Treadle (medians) | (fastest) |")
  print("|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['what'].split()[-1]} | {row['treadle_seconds'] * 1e3:.1f} | "
          f"{row['torch_seconds'] * 1e3:.1f} | {row['ratio_median']:.2f}x | "
          f"{row['ratio_fastest']:.2f}x |")
  return rows


def accelerator_plugin_installed() -> bool:
  """Whether jax may find a GPU or TPU here, judged without starting a backend."""
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return False
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
    plugins = [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  except ImportError:
    plugins = []
  return bool(plugins) or importlib.util.find_spec("libtpu") is not None


def pin_cpu_threads(threads: int) -> str:
  """Pins this process to `threads` cores before XLA:CPU starts; says what it did."""
  if not threads:
    return "all cores"
  if accelerator_plugin_installed():
    return "not pinned (an accelerator plugin is installed)"
  cores = sorted(os.sched_getaffinity(0))[:threads]
  os.sched_setaffinity(0, cores)
  return f"pinned to cores {cores}"


def pallas_rows(chip: str | None) -> list[str]:
  """The Pallas SSD rows for `chip`: none off-target, one per GPU kernel on a GPU."""
  if chip is None:
    return []
  return ["ssd_pallas", "ssd_pallas_triton"] if CHIPS[chip][0] == "gpu" else ["ssd_pallas"]


def run_args(backend: str) -> dict:
  """The flags, with the per-device defaults and --smoke's settings applied."""
  cpu = backend == "cpu"
  args = dict(
      lengths=[int(t) for t in _LENGTHS.value] or (
          [256 << i for i in range(6)] if cpu else [512 << i for i in range(8)]),
      tokens=_TOKENS.value or (8192 if cpu else 65536), heads=_HEADS.value or (8 if cpu else 24),
      head_dim=_HEAD_DIM.value, state=_STATE.value or (64 if cpu else 128),
      chunk=_CHUNK.value or (128 if cpu else 256),
      dtype=_DTYPE.value or ("float32" if cpu else "bfloat16"), impls=list(_IMPLS.value) or (
          ["ssd", "scan", "attention"] + pallas_rows(chip_of_device(jax.devices()[0]))),
      passes=list(_PASSES.value), iters=_ITERS.value, warmup=_WARMUP.value,
      mixer=_MIXER.value and cpu, mixer_tokens=_MIXER_TOKENS.value, repeats=_REPEATS.value)
  if _SMOKE.value:
    args.update(lengths=[64, 128], tokens=128, heads=2, head_dim=16, state=16, chunk=32, iters=1,
                warmup=1, mixer_tokens=64, repeats=1)
  unknown = [n for n in args["impls"] if n not in IMPLS]
  if unknown or not set(args["passes"]) <= {"fwd", "fwd+bwd"}:
    raise ValueError(f"--impls={args['impls']} / --passes={args['passes']}: impls are "
                     f"{sorted(IMPLS)}, passes fwd and fwd+bwd.")
  return args


def main(argv):
  del argv
  pinned = pin_cpu_threads(_CPU_THREADS.value)  # Before anything starts a jax backend.
  backend = jax.default_backend()
  args = run_args(backend)
  print(f"date     {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
  print(f"device   {jax.device_count()} x {jax.devices()[0].device_kind} ({backend}), "
        f"{os.cpu_count()} cores, {pinned}")
  print(f"versions jax {jax.__version__}, jaxlib {jax.lib.__version__}")
  print(f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}")
  print(f"shape    h {args['heads']}, d {args['head_dim']}, N {args['state']}, chunk "
        f"{args['chunk']}, {args['tokens']} tokens per call, {args['dtype']}; median of "
        f"{args['iters']} calls after {args['warmup']} warmup")
  problems = [Problem(max(args["tokens"] // t, 1), t, args["heads"], args["head_dim"],
                      args["state"], args["chunk"], args["dtype"]) for t in args["lengths"]]
  rows = bench_sequence_mixers(problems, args["impls"], args["passes"], args["iters"],
                               args["warmup"])
  table, crossovers = markdown(rows, args["impls"], args["passes"])
  print(table)
  meta = dict(args, device=jax.devices()[0].device_kind, backend=backend, jax=jax.__version__,
              cpu=pinned, xla_flags=os.environ.get("XLA_FLAGS", ""))
  layer_rows = []
  if args["mixer"]:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(_CPU_THREADS.value or os.cpu_count())
    meta.update(torch=torch.__version__, transformers=transformers.__version__,
                torch_threads=torch.get_num_threads())
    print(f"\nversions torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}")
    layer = Problem(1, args["mixer_tokens"], args["heads"], args["head_dim"], args["state"],
                    args["chunk"], "float32")
    layer_rows = bench_layer(layer, args["passes"], args["repeats"], args["warmup"])
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"meta": meta, "rows": rows, "crossovers": crossovers, "layer_rows": layer_rows},
                f, indent=1)


if __name__ == "__main__":
  app.run(main)
