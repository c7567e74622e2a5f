r"""RWKV-7: the WKV-7 recurrence's implementations beside attention, and (on CPU) the model
against the `rwkv` package, in one run on the current device.

  python benchmarks/rwkv7.py                                   # CPU: 1k-4k tokens + the model
  python benchmarks/rwkv7.py --lengths=1024,4096,16384,65536   # a GPU/TPU: up to 64k
  python benchmarks/rwkv7.py --smoke --json=/tmp/rwkv.json --markdown=/tmp/rwkv.md

1. The WKV-7 recurrence (layers/rwkv/wkv7.py) at batch --batch, --heads heads of
   --head_size, for each of --lengths tokens: the sequential `lax.scan` (`wkv7`,
   `model.chunk_size=0`) and the chunked matrix form (`wkv7_chunked`) at each of
   --chunk_sizes, forward and forward+backward (a VJP into all six inputs). Beside
   them, causal attention of the same width (h heads of d): on CPU the 'xla' path
   (the query-blocked layers/attention/cpu_blocked.py), on a GPU or TPU the Pallas
   flash kernel. Inputs are shaped like RWKV-7's: decays w = exp(−e^{−1/2}·σ(x)) with
   x's per-channel offset spread over [−6.5, −1.5] as RWKV-7 initialises it,
   a = −k̂ and b = k̂·σ(x) with k̂ unit-norm per head; in --dtype (the WKV computes in
   float32 whatever it is given). Attention above --attention_max_len tokens is
   skipped (its [t, t] scores). A row that fails (out of memory) prints n/a.
   One row also checks max |chunked − sequential| of the forward at the first length.
   On a kernel chip, the Pallas kernel at each chunk size too (on a GPU one row per
   `Wkv7Config.gpu_kernel`: 'mosaic' and 'triton'); more implementations are one
   entry of `wkv_implementations`.
2. On CPU (or with --model_bench=on): prefill and decode tokens/s of a small RWKV-7
   (--model: the published 0.1b shape with --layers blocks, or configs/rwkv_tiny.py's
   model) in float32 against the `rwkv` package (RWKV_V7_ON=1, RWKV_CUDA_ON=0,
   strategy "cpu fp32", --torch_threads threads) loading the same random weights,
   written as a .pth by models/rwkv/pth.py. Prefill: a --prompt_len prompt into an
   empty state (ours: `Rwkv(decode=True)` jitted, chunked and sequential, as
   train/sampling.py runs it; the package: `forward(tokens, None)`). Decode:
   --decode_tokens tokens one at a time from the prefilled state (ours: a `lax.scan`
   of single-token decode steps in one jit, as the sampler does; the package: a
   Python loop of `forward(token, state)`), fixed tokens (no sampling). The sides
   alternate --repeats blocks; reported are median tokens/s and the package's time
   over ours (> 1: Treadle faster), of the medians and of the fastest blocks. The
   last-position logits of both prefills are compared (max |Treadle − package|).

Timing: one untimed call (compilation), then the median of --iters wall-clock runs,
each ended by `block_until_ready`. The load average is recorded at the start and
end: on a shared machine the absolute numbers move, and only ratios measured in
alternating blocks mean much. Output: a markdown report on stdout (also --markdown),
and --json with the jax version, device and every number.

(Named rwkv7.py, not rwkv.py: a script's folder is first on sys.path, and a
benchmarks/rwkv.py would shadow the `rwkv` package it compares with.)
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import statistics
import tempfile
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import rwkv as rwkv_configs
from layers.attention import implementations as attention_lib
from layers.rwkv import wkv7, wkv7_chunked
from models.rwkv import Rwkv, RwkvConfig, init_cache
from models.rwkv import pth
from pallas_kernels.common.config import chip_of_device
from pallas_kernels.wkv7 import GPU_KERNELS, Wkv7Config, wkv7_pallas

WkvFn = Callable[..., jax.Array]  # (r, w, k, v, a, b [b, t, h, d]) -> y [b, t, h, d]


def wkv_implementations(chunk_sizes: list[int]) -> dict[str, WkvFn]:
  """Row name -> a WKV-7 implementation; add an entry here to benchmark another one."""
  impls = {"wkv7 sequential (xla scan)": lambda *x: wkv7(*x)[0]}
  for size in chunk_sizes:
    impls[f"wkv7 chunked {size} (xla)"] = lambda *x, size=size: wkv7_chunked(
        *x, chunk_size=size)[0]
  chip = chip_of_device(jax.devices()[0])
  if chip is None:  # The kernel targets no chip here (on CPU it would only be interpreted).
    return impls
  # A GPU times both of its kernels (Mosaic GPU, the default, and Pallas Triton).
  kernels = GPU_KERNELS if Wkv7Config(chip).platform == "gpu" else (None,)
  for size in chunk_sizes:
    for kernel in kernels:
      config = Wkv7Config(chip=chip, chunk_size=size, gpu_kernel=kernel or "mosaic")
      name = f"wkv7 pallas {size}" + (f" ({kernel})" if kernel else "")
      impls[name] = lambda *x, config=config: wkv7_pallas(*x, config=config)[0]
  return impls


def attention_implementation(backend: str) -> tuple[str, Callable]:
  """Our causal attention of the same width: the CPU-blocked XLA path, or flash on GPU/TPU
  (the Pallas kernel tuned for this chip, as `model.attention_chip` picks it)."""
  if backend == "cpu":
    return "attention xla (cpu-blocked)", lambda q, k, v: attention_lib.dot_product_attention(
        q, k, v, impl="xla")
  chip = chip_of_device(jax.devices()[0]) or ""
  return "attention pallas flash", lambda q, k, v: attention_lib.dot_product_attention(
      q, k, v, impl="pallas", chip=chip)


# ---- timing ---------------------------------------------------------------------------------

def median_ms(fn: Callable, args, iters: int) -> float:
  """Median wall time (ms) of `iters` calls after one untimed (compiling) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def guarded(fn: Callable, *args, **kwargs):
  """fn(...) or None when it fails (out of memory), printing why."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    print(f"    ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    return None


# ---- 1. the recurrence vs attention --------------------------------------------------------

def wkv_inputs(batch: int, t: int, heads: int, d: int, dtype, seed: int = 0):
  """RWKV-7-like (r, w, k, v, a, b) and a cotangent dy, each [b, t, h, d] in dtype."""
  keys = jax.random.split(jax.random.key(seed), 7)
  shape = (batch, t, heads, d)
  normal = lambda key: jax.random.normal(key, shape, jnp.float32)  # noqa: E731
  # RWKV-7-like decays: a per-channel offset from slow (w ≈ 1) to fast (w ≈ 0.6), plus noise.
  offset = jnp.linspace(-6.5, -1.5, heads * d).reshape(heads, d)
  w = jnp.exp(-np.exp(-0.5) * jax.nn.sigmoid(offset + normal(keys[1])))
  k_hat = normal(keys[2])
  k_hat = k_hat / jnp.linalg.norm(k_hat, axis=-1, keepdims=True)
  iclr = jax.nn.sigmoid(normal(keys[3]))
  xs = (normal(keys[0]), w, normal(keys[4]) / np.sqrt(d), normal(keys[5]), -k_hat, k_hat * iclr)
  return tuple(x.astype(dtype) for x in xs), normal(keys[6]).astype(dtype)


def forward_and_backward(fn: Callable, num_inputs: int) -> tuple[Callable, Callable]:
  """jitted fn(*inputs) and fn's forward + VJP(dy) into every input."""
  def fwd_bwd(*args):
    y, vjp = jax.vjp(fn, *args[:num_inputs])
    return y, vjp(args[num_inputs])
  return jax.jit(fn), jax.jit(fwd_bwd)


def bench_recurrence(args, backend: str) -> list[dict]:
  """Rows of section 1: every implementation at every length, fwd and fwd+bwd."""
  dtype = jnp.dtype(args.dtype)
  impls = wkv_implementations(args.chunk_sizes)
  attention_label, attention = attention_implementation(backend)
  rows = []
  for index, t in enumerate(args.lengths):
    xs, dy = wkv_inputs(args.batch, t, args.heads, args.head_size, dtype)
    tokens = args.batch * t
    entries = [(name, fn, xs + (dy,)) for name, fn in impls.items()]
    if not args.attention_max_len or t <= args.attention_max_len:
      entries.append((attention_label, attention, (xs[0], xs[2], xs[3], dy)))
    for name, fn, inputs in entries:
      fwd, fwd_bwd = forward_and_backward(fn, len(inputs) - 1)
      fwd_ms = guarded(median_ms, fwd, inputs[:-1], args.iters)
      all_ms = guarded(median_ms, fwd_bwd, inputs, args.iters)
      row = dict(section="recurrence", impl=name, tokens=t, batch=args.batch, heads=args.heads,
                 head_size=args.head_size, dtype=args.dtype, fwd_ms=fwd_ms, fwd_bwd_ms=all_ms,
                 fwd_bwd_tokens_per_s=tokens / all_ms * 1e3 if all_ms else None)
      print(f"  {t:7d} {name:30s} fwd {_ms(fwd_ms)}  fwd+bwd {_ms(all_ms)}", flush=True)
      rows.append(row)
    if index == 0 and len(impls) > 1:
      reference = jax.jit(impls["wkv7 sequential (xla scan)"])(*xs).astype(jnp.float32)
      for name, fn in impls.items():
        if name != "wkv7 sequential (xla scan)":
          y = guarded(jax.jit(fn), *xs)
          err = None if y is None else float(jnp.max(jnp.abs(y.astype(jnp.float32) - reference)))
          rows.append(dict(section="agreement", impl=name, tokens=t,
                           max_abs_diff_vs_sequential=err))
  return rows


def _ms(ms) -> str:
  return f"{ms:9.2f} ms" if ms is not None else "      n/a   "


# ---- 2. the model vs the rwkv package ------------------------------------------------------

def model_config(args, chunk_size: int) -> RwkvConfig:
  """The float32 model of --model (--layers blocks), long enough for prompt + decode."""
  fields = {} if args.model == "tiny" else dict(rwkv_configs.SIZES[args.model])
  if args.layers:
    fields["num_layers"] = args.layers
  if args.vocab:
    fields["vocab_size"] = args.vocab
  return RwkvConfig(**fields, chunk_size=chunk_size, scan_layers=False, dtype="float32",
                    max_seq_len=args.prompt_len + args.decode_tokens + 1)


class TreadleSide:
  """Jitted prefill (a prompt into an empty cache) and a scanned single-token decode."""

  def __init__(self, cfg: RwkvConfig, params):
    model = Rwkv(cfg)
    self.params = params

    def prefill(params, tokens):
      cache = init_cache(cfg, tokens.shape[0], 0)
      logits, updated = model.apply({"params": params, "cache": cache}, tokens, decode=True,
                                    last_logits_only=True, mutable=["cache"])  # as the sampler
      return logits[:, -1], updated["cache"]

    def decode(params, cache, tokens):
      def step(cache, token):
        logits, updated = model.apply({"params": params, "cache": cache}, token[:, None],
                                      decode=True, mutable=["cache"])
        return updated["cache"], logits[:, -1]
      cache, logits = jax.lax.scan(step, cache, tokens.T)
      return logits[-1], cache

    self.prefill_fn, self.decode_fn = jax.jit(prefill), jax.jit(decode)

  def prefill(self, prompt: list[int]):
    logits, cache = self.prefill_fn(self.params, np.array([prompt], np.int32))
    return jax.block_until_ready((np.asarray(logits[0]), cache))

  def decode(self, cache, tokens: list[int]):
    return jax.block_until_ready(self.decode_fn(self.params, cache, np.array([tokens], np.int32)))


class PackageSide:
  """The `rwkv` package's RWKV-7 (cpu fp32) on a .pth; imported here, after its env vars."""

  def __init__(self, stem: str):
    os.environ["RWKV_V7_ON"], os.environ["RWKV_CUDA_ON"] = "1", "0"
    from rwkv.model import RWKV  # pylint: disable=g-import-not-at-top
    self.model = RWKV(model=stem, strategy="cpu fp32")

  def prefill(self, prompt: list[int]):
    logits, state = self.model.forward(list(prompt), None)
    return logits.float().numpy(), state

  def decode(self, state, tokens: list[int]):
    state = [s.clone() for s in state]
    for token in tokens:
      logits, state = self.model.forward(int(token), state)
    return logits, state


def timed_blocks(sides: dict, run: Callable, repeats: int, warmup: int) -> dict[str, list[float]]:
  """`warmup` untimed runs per side (XLA compiles on the first, TorchScript's profiling
  executor on the second), then `repeats` alternating timed runs: seconds each."""
  times = {name: [] for name in sides}
  for side in sides.values():
    for _ in range(warmup):
      run(side)
  for _ in range(repeats):
    for name, side in sides.items():
      start = time.perf_counter()
      run(side)
      times[name].append(time.perf_counter() - start)
  return times


def bench_model(args) -> list[dict]:
  """Rows of section 2: prefill and decode tokens/s, Treadle vs the `rwkv` package."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.torch_threads)
  chunked_cfg = model_config(args, args.chunk_sizes[0] if args.chunk_sizes else 16)
  sequential_cfg = model_config(args, 0)
  params = nn.unbox(Rwkv(sequential_cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))[
      "params"])
  workdir = tempfile.mkdtemp(prefix="treadle_rwkv_bench_")
  path = os.path.join(workdir, "model.pth")
  pth.write_checkpoint(path, sequential_cfg, {"params": params})
  plain = pth.params_from_pth(pth.read_pth(path), sequential_cfg)  # exactly the file's weights
  rng = np.random.default_rng(0)
  prompt = [int(x) for x in rng.integers(0, sequential_cfg.vocab_size, args.prompt_len)]
  continuation = [int(x) for x in rng.integers(0, sequential_cfg.vocab_size,
                                               args.decode_tokens)]
  cfg = sequential_cfg
  print(f"\n## Model: {args.model}, {cfg.num_layers} layers, e {cfg.embed_dim}, h "
        f"{cfg.num_heads} x d {cfg.head_size}, vocab {cfg.vocab_size}, float32; torch threads "
        f"{torch.get_num_threads()}")
  package = PackageSide(os.path.splitext(path)[0])
  chunk_label = f"treadle chunked {chunked_cfg.chunk_size}"
  sides = {chunk_label: TreadleSide(chunked_cfg, plain),
           "treadle sequential": TreadleSide(sequential_cfg, plain), "rwkv package": package}
  prefill_logits = {name: side.prefill(prompt)[0] for name, side in sides.items()}
  agreement = {name: float(np.max(np.abs(logits - prefill_logits["rwkv package"])))
               for name, logits in prefill_logits.items() if name != "rwkv package"}
  scale = float(np.max(np.abs(prefill_logits["rwkv package"])))
  rows = []
  times = timed_blocks(sides, lambda side: side.prefill(prompt), args.repeats, args.warmup)
  rows += _model_rows("prefill", times, args.prompt_len, agreement, scale)
  decoders = {"treadle": sides["treadle sequential"], "rwkv package": package}
  states = {name: side.prefill(prompt)[1] for name, side in decoders.items()}
  decode_from = lambda name: lambda: decoders[name].decode(states[name], continuation)  # noqa: E731
  times = timed_blocks({name: decode_from(name) for name in decoders}, lambda run: run(),
                       args.repeats, args.warmup)
  rows += _model_rows("decode", times, args.decode_tokens, {}, scale)
  for row in rows:
    row.update(model=args.model, layers=sequential_cfg.num_layers,
               embed_dim=sequential_cfg.embed_dim, vocab_size=sequential_cfg.vocab_size,
               torch_threads=torch.get_num_threads())
  return rows


def _model_rows(phase: str, times: dict, tokens: int, agreement: dict, scale: float) -> list:
  package = times["rwkv package"]
  rows = []
  for name, t in times.items():
    row = dict(section="model", phase=phase, side=name, tokens=tokens,
               tokens_per_s=tokens / statistics.median(t),
               fastest_tokens_per_s=tokens / min(t))
    if name != "rwkv package":
      row["ratio_median"] = statistics.median(package) / statistics.median(t)
      row["ratio_fastest"] = min(package) / min(t)
    if name in agreement:
      row["max_abs_logit_diff"], row["logit_scale"] = agreement[name], scale
    ratio = (f"  ratio {row['ratio_median']:.2f}x (fastest {row['ratio_fastest']:.2f}x)"
             if "ratio_median" in row else "")
    print(f"  {phase:7s} {name:22s} {row['tokens_per_s']:10.1f} tokens/s{ratio}", flush=True)
    rows.append(row)
  return rows


# ---- report -----------------------------------------------------------------------------------

def markdown(meta: dict, rows: list[dict]) -> str:
  """The report: meta lines, the recurrence table, the agreement lines, the model table."""
  lines = [f"# RWKV-7 benchmark, {meta['date']}", "",
           f"{meta['device']} ({meta['backend']}), {meta['cores']} cores; jax {meta['jax']}, "
           f"jaxlib {meta['jaxlib']}; load average {meta['load_start']} at the start, "
           f"{meta['load_end']} at the end (a shared machine moves absolute numbers).", ""]
  recurrence = [r for r in rows if r["section"] == "recurrence"]
  if recurrence:
    first = recurrence[0]
    lines += [f"## WKV-7 vs attention: batch {first['batch']}, {first['heads']} heads x "
              f"{first['head_size']}, {first['dtype']}, median of {meta['iters']}", "",
              "| tokens | implementation | fwd ms | fwd+bwd ms | fwd+bwd tokens/s |",
              "|---:|---|---:|---:|---:|"]
    for r in recurrence:
      rate = f"{r['fwd_bwd_tokens_per_s']:,.0f}" if r["fwd_bwd_tokens_per_s"] else "n/a"
      cell = lambda ms: f"{ms:.2f}" if ms is not None else "n/a"  # noqa: E731
      lines.append(f"| {r['tokens']} | {r['impl']} | {cell(r['fwd_ms'])} | "
                   f"{cell(r['fwd_bwd_ms'])} | {rate} |")
    lines.append("")
  for r in rows:
    if r["section"] == "agreement":
      err = r["max_abs_diff_vs_sequential"]
      lines.append(f"- {r['impl']} at {r['tokens']} tokens: max |y − sequential| = "
                   f"{err:.2e}" if err is not None else f"- {r['impl']}: failed")
  model = [r for r in rows if r["section"] == "model"]
  if model:
    first = model[0]
    lines += ["", f"## Model vs the `rwkv` package: {first['model']}, {first['layers']} layers, "
              f"e {first['embed_dim']}, vocab {first['vocab_size']}, float32, torch threads "
              f"{first['torch_threads']}", "",
              "| phase | side | tokens | tokens/s | fastest tokens/s | package time / ours "
              "(median, fastest) | max abs logit diff |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in model:
      ratio = (f"{r['ratio_median']:.2f}x, {r['ratio_fastest']:.2f}x" if "ratio_median" in r
               else "")
      diff = (f"{r['max_abs_logit_diff']:.1e} (of {r['logit_scale']:.1f})"
              if "max_abs_logit_diff" in r else "")
      lines.append(f"| {r['phase']} | {r['side']} | {r['tokens']} | {r['tokens_per_s']:,.1f} | "
                   f"{r['fastest_tokens_per_s']:,.1f} | {ratio} | {diff} |")
  return "\n".join(lines) + "\n"


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
  parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script runs")
  parser.add_argument("--lengths", type=ints, default=None,
                      help="tokens per row (default: 1024,2048,4096 on CPU, 1k..64k elsewhere)")
  parser.add_argument("--chunk_sizes", type=ints, default=[16, 32],
                      help="chunked WKV rows (above 32 a trained model loses float32 digits)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=0, help="h (0: 4 on CPU, 12 elsewhere)")
  parser.add_argument("--head_size", type=int, default=64, help="d (RWKV-7's 64)")
  parser.add_argument("--dtype", default="", help="input dtype (default: float32 on CPU, "
                      "bfloat16 elsewhere, where flash attention wants it)")
  parser.add_argument("--attention_max_len", type=int, default=-1,
                      help="skip attention above this many tokens (-1: 8192 on CPU; 0: never)")
  parser.add_argument("--iters", type=int, default=0, help="timed runs (0: 3 on CPU, 20 elsewhere)")
  parser.add_argument("--model_bench", choices=["auto", "on", "off"], default="auto",
                      help="section 2 (auto: on CPU only, where the package runs)")
  parser.add_argument("--model", choices=["tiny", "0.1b"], default="0.1b")
  parser.add_argument("--layers", type=int, default=2, help="blocks (0: the model's own)")
  parser.add_argument("--vocab", type=int, default=0, help="vocabulary (0: the model's own)")
  parser.add_argument("--prompt_len", type=int, default=512)
  parser.add_argument("--decode_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3, help="alternating timed blocks")
  parser.add_argument("--warmup", type=int, default=2, help="untimed runs per side first")
  parser.add_argument("--torch_threads", type=int, default=2)
  parser.add_argument("--json", default="", help="also write meta + rows to this JSON file")
  parser.add_argument("--markdown", default="", help="also write the report to this file")
  args = parser.parse_args(argv)
  cpu = jax.default_backend() == "cpu"
  if args.smoke:
    args.lengths, args.chunk_sizes, args.heads, args.head_size = [64, 96], [16], 2, 16
    args.iters, args.model, args.layers, args.prompt_len = 1, "tiny", 2, 24
    args.decode_tokens, args.repeats = 4, 1
  args.lengths = args.lengths or ([1024, 2048, 4096] if cpu else
                                  [1024, 2048, 4096, 8192, 16384, 32768, 65536])
  args.heads = args.heads or (4 if cpu else 12)
  args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
  args.attention_max_len = 8192 if args.attention_max_len < 0 and cpu else max(
      args.attention_max_len, 0)
  args.iters = args.iters or (3 if cpu else 20)
  return args


def main(argv=None):
  args = parse_args(argv)
  backend = jax.default_backend()
  device = jax.devices()[0]
  meta = dict(date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
              device=device.device_kind, backend=backend, cores=os.cpu_count(),
              jax=jax.__version__, jaxlib=jax.lib.__version__,
              xla_flags=os.environ.get("XLA_FLAGS", ""),
              load_start=" ".join(f"{x:.2f}" for x in os.getloadavg()), iters=args.iters,
              args={k: v for k, v in vars(args).items() if k not in ("json", "markdown")})
  print(f"{meta['date']}: {device.device_kind} ({backend}), jax {jax.__version__}; "
        f"load {meta['load_start']}")
  print(f"## WKV-7 vs attention: batch {args.batch}, {args.heads} heads x {args.head_size}, "
        f"{args.dtype}, lengths {args.lengths}")
  rows = bench_recurrence(args, backend)
  if args.model_bench == "on" or (args.model_bench == "auto" and backend == "cpu"):
    rows += bench_model(args)
  meta["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
  for package in ("torch", "rwkv"):
    try:
      meta[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  report = markdown(meta, rows)
  print("\n" + report)
  if args.markdown:
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(report)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
