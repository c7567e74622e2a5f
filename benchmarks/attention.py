"""Attention benchmark: our Pallas flash attention vs cuDNN, XLA and jax's Mosaic GPU op.

    python benchmarks/attention.py            # on an H100 / H200 (or a TPU: ours vs XLA)
    python benchmarks/attention.py --smoke    # tiny sizes on CPU, kernels interpreted
    python benchmarks/attention.py --only="S8192 H16 D128" --json=rows.jsonl  # some rows, JSON too

Problems (bf16): B*S = 16k tokens, H*D = 2048, head_dim 64 and 128, S in
2k/4k/8k/16k, causal and not; plus at S = 8k, head_dim 128: GQA 4:1, 4 packed
segments (causal), and a causal 1k window. Each is timed forward, backward and
forward+backward on the current device in this one run. Backward is
(forward+backward) - forward.

FLOPs: forward 4*B*H*S^2*D, halved for causal; windows and segments count only
visible (query, key) pairs; backward 2.5x forward. cuDNN and XLA get is_causal /
local_window_size (never an explicit mask); packed segments of equal length are
given to them (and to jax's Mosaic GPU op, which has no segment ids) as a batch
of separate sequences, which is the same computation.

Timing: random inputs (two sets, alternated, each larger than L2), warm-up,
then the median of --iters runs; on GPU with CUPTI device timers when available
(jax.experimental.mosaic.gpu.profiler), else wall clock after block_until_ready.
"""

import argparse
import dataclasses
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.common import config as config_lib
from pallas_kernels.flash_attention import flash_attention


@dataclasses.dataclass(frozen=True)
class Problem:
  """One benchmark row."""
  batch: int
  seq: int
  heads: int
  head_dim: int
  causal: bool
  kv_heads: int | None = None
  segments: int = 0
  window: int | None = None

  @property
  def name(self) -> str:
    extra = [f"gqa{self.heads // self.kv_heads}:1"] if self.kv_heads else []
    extra += [f"{self.segments}seg"] if self.segments else []
    extra += [f"win{self.window}"] if self.window else []
    return (f"B{self.batch} S{self.seq} H{self.heads} D{self.head_dim}"
            f"{' causal' if self.causal else ''}{' ' + ' '.join(extra) if extra else ''}")

  def visible_pairs(self) -> float:
    """Visible (query, key) pairs per (batch, head)."""
    s = self.seq // max(self.segments, 1)
    pairs = s * s / 2 if self.causal else s * s
    if self.window:
      w = self.window
      pairs = s * (w + 1) - w * (w + 1) / 2 if self.causal else s * (2 * w + 1) - w * (w + 1)
    return pairs * max(self.segments, 1)

  def fwd_flops(self) -> float:
    return 4 * self.batch * self.heads * self.visible_pairs() * self.head_dim


def problems(smoke: bool):
  if smoke:
    return [
        Problem(2, 128, 2, 64, False), Problem(2, 128, 2, 64, True),
        Problem(1, 256, 4, 64, True, kv_heads=1), Problem(1, 256, 2, 64, True, segments=4),
        Problem(1, 256, 2, 64, True, window=64)]
  rows = []
  for head_dim in (64, 128):
    for seq in (2048, 4096, 8192, 16384):
      for causal in (False, True):
        rows.append(Problem(16384 // seq, seq, 2048 // head_dim, head_dim, causal))
  rows += [Problem(2, 8192, 16, 128, True, kv_heads=4),
           Problem(2, 8192, 16, 128, True, segments=4),
           Problem(2, 8192, 16, 128, True, window=1024)]
  return rows


def make_inputs(p: Problem, seed: int):
  keys = jax.random.split(jax.random.key(seed), 4)
  kv_heads = p.kv_heads or p.heads
  q = jax.random.normal(keys[0], (p.batch, p.seq, p.heads, p.head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (p.batch, p.seq, kv_heads, p.head_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (p.batch, p.seq, kv_heads, p.head_dim), jnp.bfloat16)
  do = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  return q, k, v, do


def _as_separate_sequences(fn, p: Problem):
  """Runs fn on [B * n, S / n, ...] for n equal packed segments (baselines)."""
  if not p.segments:
    return fn
  n = p.segments
  split = lambda x: x.reshape(x.shape[0] * n, x.shape[1] // n, *x.shape[2:])
  merge = lambda x: x.reshape(x.shape[0] // n, x.shape[1] * n, *x.shape[2:])
  return lambda q, k, v: merge(fn(split(q), split(k), split(v)))


def implementations(p: Problem, *, interpret: bool, config):
  """name -> fn(q, k, v); entries that cannot run here are skipped by the caller."""
  window = (p.window, 0) if p.window else None
  ids = None
  if p.segments:
    ids = jnp.repeat(jnp.arange(p.segments, dtype=jnp.int32), p.seq // p.segments)
    ids = jnp.broadcast_to(ids, (p.batch, p.seq))
  impls = {"pallas (ours)": lambda q, k, v: flash_attention(
      q, k, v, causal=p.causal, q_segment_ids=ids, kv_segment_ids=ids,
      local_window_size=window, interpret=interpret, config=config)}
  for impl in ("cudnn", "xla"):
    impls[impl] = _as_separate_sequences(functools.partial(
        jax.nn.dot_product_attention, is_causal=p.causal, local_window_size=window,
        implementation=impl), p)
  impls["jax mosaic-gpu"] = _as_separate_sequences(_jax_mgpu_attention(p), p)
  return impls


def _jax_mgpu_attention(p: Problem):
  """jax's shipped Mosaic GPU FlashAttention3 op (no windows; no causal backward)."""
  def fn(q, k, v):
    if p.window:
      raise NotImplementedError("no local window in jax's Mosaic GPU attention")
    from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=g-import-not-at-top
    blocks = dict(block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    cfg = attention_mgpu.TuningConfig(block_q=64, block_kv=128 if p.head_dim <= 128 else 64,
                                      max_concurrent_steps=2, causal=p.causal, **blocks)
    return attention_mgpu.attention(q, k, v, cfg)
  return fn


def _timer(fn, args_sets, iters: int, use_cupti: bool):
  """Median runtime (ms) of fn over iters runs, alternating input sets."""
  for args in args_sets:  # Warm-up (compiles) on every input set.
    jax.block_until_ready(fn(*args))
  if use_cupti:
    try:
      from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
      times = []
      for i in range(iters):
        _, ms = profiler.measure(fn)(*args_sets[i % len(args_sets)])
        if ms is None:
          raise RuntimeError("no kernel timed")
        times.append(ms)
      return statistics.median(times)
    except Exception:  # pylint: disable=broad-except
      pass  # CUPTI unavailable: fall back to wall clock.
  times = []
  for i in range(iters):
    args = args_sets[i % len(args_sets)]
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def time_problem(p: Problem, impl_fn, args_sets, iters: int, use_cupti: bool):
  """(fwd_ms, bwd_ms, fwd_bwd_ms); None entries where the impl fails."""
  fwd = jax.jit(impl_fn)

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(impl_fn, q, k, v)
    return out, vjp(do)
  fwd_bwd = jax.jit(fwd_bwd)
  results = []
  for fn, sets in ((fwd, [a[:3] for a in args_sets]), (fwd_bwd, args_sets)):
    try:
      results.append(_timer(fn, sets, iters, use_cupti))
    except Exception as e:  # pylint: disable=broad-except
      results.append(None)
      print(f"    ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
  t_fwd, t_all = results
  t_bwd = t_all - t_fwd if t_fwd is not None and t_all is not None else None
  return t_fwd, t_bwd, t_all


def _max_error(p: Problem, impls, args):
  """Forward max |ours - xla| on one input set (a cheap miscompile check), or None."""
  del p
  try:
    ours = jax.jit(impls["pallas (ours)"])(*args[:3])
    want = jax.jit(impls["xla"])(*args[:3])
    return float(jnp.max(jnp.abs(ours.astype(jnp.float32) - want.astype(jnp.float32))))
  except Exception:  # pylint: disable=broad-except
    return None


def write_row(path: str, row: dict) -> None:
  """Appends `row` to the JSON-lines file `path` (--json; nothing when empty).

  One line per printed row, written as it is printed, so a run stopped
  part-way keeps the rows it finished.
  """
  if path:
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")


def _cell(ms, flops):
  if ms is None:
    return "       n/a       "
  return f"{ms:8.3f} {flops / ms / 1e9:7.3g}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes; interpret on CPU")
  parser.add_argument("--iters", type=int, default=None, help="timed runs per entry")
  parser.add_argument("--only", default="", help="substring filter on row names")
  parser.add_argument("--json", default="", help="also append each row to this JSON-lines file")
  args = parser.parse_args()
  backend = jax.default_backend()
  interpret = backend == "cpu"
  device = jax.devices()[0]
  chip = config_lib.chip_of_device(device)
  config = config_lib.default_config(chip) if chip else None  # CPU: interpret default.
  iters = args.iters or (3 if args.smoke or interpret else 30)
  print(f"device: {device.device_kind} ({backend}); kernel config: "
        f"{config.chip if config else 'tpu_v5e (interpret)'}; median of {iters} runs")
  print("columns per pass: ms, TFLOP/s; ratio = cuDNN time / our time")
  header = f"{'problem':42s} {'impl':15s} {'fwd':>17s} {'bwd':>17s} {'fwd+bwd':>17s}  ratio(f/b/fb)"
  print(header)
  print("-" * len(header))
  for p in problems(args.smoke):
    if args.only not in p.name:
      continue
    args_sets = [make_inputs(p, seed) for seed in (0, 1)]
    flops = (p.fwd_flops(), 2.5 * p.fwd_flops(), 3.5 * p.fwd_flops())
    rows = {}
    for name, fn in implementations(p, interpret=interpret, config=config).items():
      if name != "pallas (ours)" and (backend != "gpu" and name != "xla"):
        continue  # cuDNN and Mosaic GPU only run on NVIDIA GPUs.
      rows[name] = time_problem(p, fn, args_sets, iters, use_cupti=backend == "gpu")
    err = _max_error(p, implementations(p, interpret=interpret, config=config), args_sets[0])
    base = rows.get("cudnn")
    for name, times in rows.items():
      ratio = ""
      if base:
        ratio = "/".join(f"{b / t:.2f}" if b and t else "n/a" for b, t in zip(base, times))
      cells = " ".join(_cell(t, f) for t, f in zip(times, flops))
      note = f"  max|ours - xla| {err:.1e}" if name == "pallas (ours)" and err is not None else ""
      print(f"{p.name:42s} {name:15s} {cells}  {ratio}{note}", flush=True)
      write_row(args.json, dict(
          problem=p.name, impl=name, fwd_ms=times[0], bwd_ms=times[1], fwd_bwd_ms=times[2],
          fwd_bwd_tflops=flops[2] / times[2] / 1e9 if times[2] else None,
          cudnn_time_ratio=base[2] / times[2] if base and base[2] and times[2] else None,
          max_err_vs_xla=err if name == "pallas (ours)" else None))


if __name__ == "__main__":
  main()
