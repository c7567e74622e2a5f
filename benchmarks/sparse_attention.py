"""Block-sparse attention benchmark: our block-sparse kernel vs our dense flash attention.

    python benchmarks/sparse_attention.py            # on an H100 / H200 (or a TPU)
    python benchmarks/sparse_attention.py --smoke    # tiny sizes on CPU, kernels interpreted
    python benchmarks/sparse_attention.py --nsa --only=S8192 --json=rows.jsonl  # 8k rows, JSON too

Problems (bf16, head_dim 128, B = 1, H = 16): S = 8k and 32k; masks: random
per-tile BlockMasks at densities 100, 50, 25, 12.5 and 6 % (tiles of 128
tokens on GPU, 512 on TPU, shared by all heads) and structured ones (causal, causal 2k sliding
window, chunked causal 2k, prefix-LM). Both kernels run with the same config.
Each row is timed forward, backward and forward+backward (backward =
fwd+bwd - fwd). TFLOP/s count useful FLOPs only: forward 4 * B * d * (visible
pairs summed over heads), backward 2.5x. `ratio` = dense flash (no mask) time /
block-sparse time. The block map's build time (numpy, once per mask and
geometry, outside the step) is printed on its own.

NSA: `nsa_rows` (--nsa) times the callables registered in NSA_IMPLEMENTATIONS
against dense causal flash at 8k..64k (H = 64, K = 4, d = 128). Registered:
NativeSparseAttention's attention core (layers/attention/nsa.py past its projections;
top-16 blocks of 64, compression 32 / 16, window 512) with
attention_impl='pallas' (the selection kernels of pallas_kernels/nsa_selection
for the device's chip, forward and backward, and flash attention for the
window; interpreted on CPU), and off TPU also with 'xla' (einsums over dense
[t, s] masks and scores, quadratic memory: expect n/a cells, out of memory, at
long S).

Timing is benchmarks/attention.py's: random inputs, two alternated sets,
warm-up, median of --iters runs, CUPTI device timers on GPU when available.
--only keeps the rows whose label (problem and impl) holds one of its
comma-separated substrings; the dense baselines of a kept row always run.
"""

import argparse
import dataclasses
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention as dense_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

from layers.attention import nsa as nsa_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from layers.attention import nsa_compression as nsa_cmp  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels.block_sparse import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    CausalMask, ChunkedCausalMask, LocalMask, PrefixLMMask, block_sparse_attention,
    build_block_map, random_block_mask)
from pallas_kernels.common import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels.flash_attention import flash_attention  # pylint: disable=g-import-not-at-top,wrong-import-position

DENSITIES = (1.0, 0.5, 0.25, 0.125, 0.06)

# name -> callable(q, k, v) -> out, with q [b, t, h, d], k/v [b, s, k, d]
# (causal NSA attention); filled in below.
NSA_IMPLEMENTATIONS = {}

# NSA settings of the rows (the paper's, and the layer's defaults).
NSA_SETTINGS = dict(compress_block=32, compress_stride=16, select_block=64, select_top_n=16,
                    window=512)


class NSACore(nsa_lib.NativeSparseAttention):
  """NativeSparseAttention past its projections: q [b, t, h, d], k, v [b, s, k, d] -> [b, t, h, d].

  Runs the layer's own branches (`_forward`: compression MLPs, compressed
  attention, top-n selection, selected-block and sliding-window attention) with
  one k, v shared by the three branches, and averages them (fixed gates: the
  gate projection is the layer's, not attention).
  """

  @nn.compact
  def __call__(self, q, k, v):
    self._check()
    kw = dict(block=self.compress_block, stride=self.compress_stride, dtype=self.dtype,
              param_dtype=self.param_dtype)
    compressors = (nsa_cmp.CompressKV(name="compress_key", **kw),
                   nsa_cmp.CompressKV(name="compress_value", **kw))
    branches = nsa_lib.BRANCHES
    outs, _ = self._forward(q, dict.fromkeys(branches, k), dict.fromkeys(branches, v), None,
                            compressors)
    return (sum(o.astype(jnp.float32) for o in outs) / len(outs)).astype(q.dtype)


def nsa_paths(chip: str | None) -> tuple[str, ...]:
  """attention_impl values of the NSA rows: 'pallas', and 'xla' (einsum) off TPU."""
  on_tpu = chip is not None and config_lib.default_config(chip).platform == "tpu"
  return ("pallas",) if on_tpu else ("pallas", "xla")


@functools.lru_cache(maxsize=None)
def _nsa_params(num_heads: int, num_kv_heads: int, head_dim: int, dtype: str):
  """Fixed parameters of NSACore (the compression MLPs), made once per geometry.

  Concrete even when called while the timed function is traced, so they are
  constants of the timed program, not part of it.
  """
  core = NSACore(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 attention_impl="xla", dtype=dtype, **NSA_SETTINGS)
  t = 2 * NSA_SETTINGS["select_block"]  # Parameters do not depend on t.
  with jax.ensure_compile_time_eval():
    q = jnp.zeros((1, t, num_heads, head_dim), dtype)
    kv = jnp.zeros((1, t, num_kv_heads, head_dim), dtype)
    return jax.jit(core.init)(jax.random.key(0), q, kv, kv)


def nsa_layer_core(path: str, chip: str | None):
  """callable(q, k, v) -> NSACore output on `path` ('pallas' | 'xla')."""
  def fn(q, k, v):
    core = NSACore(num_heads=q.shape[2], num_kv_heads=k.shape[2], head_dim=q.shape[3],
                   attention_impl=path, attention_chip=chip if path == "pallas" else "",
                   dtype=q.dtype, **NSA_SETTINGS)
    params = _nsa_params(q.shape[2], k.shape[2], q.shape[3], jnp.dtype(q.dtype).name)
    return core.apply(params, q, k, v)
  return fn


_CHIP = config_lib.chip_of_device(jax.devices()[0])
for _path in nsa_paths(_CHIP):
  NSA_IMPLEMENTATIONS[f"core {_path}"] = nsa_layer_core(_path, _CHIP)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One geometry; masks are benchmarked on it."""
  batch: int
  seq: int
  heads: int
  head_dim: int
  tile: int  # Token tile of the random BlockMasks.

  @property
  def name(self) -> str:
    return f"B{self.batch} S{self.seq} H{self.heads} D{self.head_dim}"


def problems(smoke: bool, config):
  """Random masks use tiles aligned to every kernel's tiles (Hopper 128, TPU 512
  with the default tables): finer patterns make PARTIAL tiles everywhere."""
  if smoke:
    return [Problem(1, 256, 2, 64, 32)]
  tile = 512 if config is not None and config.platform == "tpu" else 128
  return [Problem(1, 8192, 16, 128, tile), Problem(1, 32768, 16, 128, tile)]


def masks_for(p: Problem, smoke: bool):
  """name -> Mask: random block masks by density, then structured masks."""
  out = {f"random {d * 100:g}%": random_block_mask(
      0, q_len=p.seq, kv_len=p.seq, block_size=p.tile, density=d) for d in DENSITIES}
  window = 64 if smoke else 2048
  out["causal"] = CausalMask()
  out[f"causal window {window}"] = CausalMask() & LocalMask(window, 0)
  out[f"chunked causal {window}"] = ChunkedCausalMask(window)
  out[f"prefix-lm {window}"] = PrefixLMMask(window)
  return out


def _inputs(p: Problem, seed: int):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (p.batch, p.seq, p.heads, p.head_dim)
  return tuple(jax.random.normal(key, shape, jnp.bfloat16) for key in keys)


def _cells(times, flops):
  return " ".join(dense_bench._cell(t, f) for t, f in zip(times, flops))  # pylint: disable=protected-access


def _time(fn, args_sets, iters, use_cupti, p):
  return dense_bench.time_problem(p, fn, args_sets, iters, use_cupti)


def _kept(label: str, only: str) -> bool:
  """Whether --only keeps the row `label`: empty keeps all, else any comma-separated part."""
  return not only or any(part in label for part in only.split(","))


def _fraction(base, t):
  return base / t if base and t else None


def _row(json_path, p, impl, times, **extra):
  """Appends one row (--json): problem, impl, fwd/bwd/fwd+bwd ms and extra fields."""
  dense_bench.write_row(json_path, dict(problem=p.name, impl=impl, fwd_ms=times[0],
                                        bwd_ms=times[1], fwd_bwd_ms=times[2], **extra))


def run_problem(p: Problem, *, config, interpret, iters, use_cupti, smoke, only="",
                json_path=""):
  """Prints the dense rows and one row per mask kept by `only`."""
  masks = {name: mask for name, mask in masks_for(p, smoke).items()
           if _kept(f"{p.name} sparse {name}", only)}
  if not masks:
    return
  args_sets = [_inputs(p, seed) for seed in (0, 1)]
  dense_flops = 4.0 * p.batch * p.heads * p.seq * p.seq * p.head_dim
  kw = dict(interpret=interpret, config=config)
  dense = _time(lambda q, k, v: flash_attention(q, k, v, **kw), args_sets, iters, use_cupti, p)
  causal = _time(lambda q, k, v: flash_attention(q, k, v, causal=True, **kw), args_sets, iters,
                 use_cupti, p)
  flops = lambda fwd: (fwd, 2.5 * fwd, 3.5 * fwd)
  print(f"{p.name:24s} {'flash dense':26s} {'':>8s} {_cells(dense, flops(dense_flops))}")
  print(f"{p.name:24s} {'flash causal':26s} {'':>8s} "
        f"{_cells(causal, flops(dense_flops / 2))}  "
        + "/".join(_ratio(d, c) for d, c in zip(dense, causal)))
  _row(json_path, p, "flash dense", dense)
  _row(json_path, p, "flash causal", causal, dense_time_ratio=_fraction(dense[2], causal[2]))
  cfg = config or config_lib.default_config("tpu_v5e")
  for name, mask in masks.items():
    block_map = build_block_map(mask, q_len=p.seq, kv_len=p.seq, num_q_heads=p.heads,
                                head_dim=p.head_dim, config=cfg, interpret=interpret)
    build_ms = block_map.build_seconds * 1e3  # The build itself (not a cache hit).
    useful = 4.0 * p.batch * p.head_dim * block_map.visible_pairs
    times = _time(lambda q, k, v, m=block_map: block_sparse_attention(q, k, v, m, **kw),
                  args_sets, iters, use_cupti, p)
    ratio = "/".join(_ratio(d, t) for d, t in zip(dense, times))
    print(f"{p.name:24s} {'sparse ' + name:26s} {block_map.density():7.1%} "
          f"{_cells(times, flops(useful))}  {ratio}  map build {build_ms:.1f} ms", flush=True)
    _row(json_path, p, "sparse " + name, times, density=block_map.density(),
         dense_time_ratio=_fraction(dense[2], times[2]), map_build_ms=build_ms)


def _ratio(base, t):
  return f"{base / t:.2f}" if base and t else "n/a"


def nsa_rows(*, config, interpret, iters, use_cupti, smoke, implementations=None, only="",
             json_path=""):
  """NSA forward/backward vs dense causal flash at S = 8k, 16k, 32k, 64k (H = 64, K = 4).

  implementations: name -> callable(q, k, v) (default NSA_IMPLEMENTATIONS);
  each is timed like the rows above (fwd, bwd, fwd+bwd) with the time ratio
  to causal flash attention; TFLOP/s are those of causal flash's FLOPs (NSA
  does fewer: the ratio is the speedup that matters). Prints nothing when no
  implementation is registered. `only` filters rows as in run_problem.
  """
  implementations = NSA_IMPLEMENTATIONS if implementations is None else implementations
  if not implementations:
    print("NSA: no implementation registered in NSA_IMPLEMENTATIONS; rows skipped.")
    return
  seqs = (256,) if smoke else (8192, 16384, 32768, 65536)
  heads, kv_heads, head_dim = (4, 1, 64) if smoke else (64, 4, 128)
  kw = dict(interpret=interpret, config=config)
  for seq in seqs:
    p = Problem(1, seq, heads, head_dim, 64)
    kept = {name: fn for name, fn in implementations.items()
            if _kept(f"{p.name} nsa {name}", only)}
    if not kept:
      continue
    keys = jax.random.split(jax.random.key(seq), 4)
    mk = lambda key, h: jax.random.normal(key, (1, seq, h, head_dim), jnp.bfloat16)
    args_sets = [(mk(keys[0], heads), mk(keys[1], kv_heads), mk(keys[2], kv_heads),
                  mk(keys[3], heads))]
    flops = 2.0 * heads * seq * seq * head_dim
    base = _time(lambda q, k, v: flash_attention(q, k, v, causal=True, **kw), args_sets, iters,
                 use_cupti, p)
    print(f"{p.name:24s} {'flash causal (NSA base)':26s} {'':>8s} "
          f"{_cells(base, (flops, 2.5 * flops, 3.5 * flops))}")
    _row(json_path, p, "flash causal (NSA base)", base)
    for name, fn in kept.items():
      times = _time(fn, args_sets, iters, use_cupti, p)
      print(f"{p.name:24s} {'nsa ' + name:26s} {'':>8s} "
            f"{_cells(times, (flops, 2.5 * flops, 3.5 * flops))}  "
            + "/".join(_ratio(b, t) for b, t in zip(base, times)), flush=True)
      _row(json_path, p, "nsa " + name, times, flash_causal_time_ratio=_fraction(base[2], times[2]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes; interpret on CPU")
  parser.add_argument("--iters", type=int, default=None, help="timed runs per entry")
  parser.add_argument("--nsa", action="store_true", help="also run the NSA rows")
  parser.add_argument("--only", default="",
                      help="comma-separated substrings; keep rows whose label holds one")
  parser.add_argument("--json", default="", help="also append each row to this JSON-lines file")
  args = parser.parse_args()
  backend = jax.default_backend()
  interpret = backend == "cpu"
  chip = config_lib.chip_of_device(jax.devices()[0])
  config = config_lib.default_config(chip) if chip else None
  if config is None and args.smoke:  # Interpreted: tiles small enough to be sparse.
    config = config_lib.FlashAttentionConfig(
        "tpu_v5e", **{name: 32 for name in ("block_q", "block_kv", "block_q_dq",
                                            "block_kv_dq", "block_q_dkv", "block_kv_dkv")})
  iters = args.iters or (2 if interpret else 30)
  print(f"device: {jax.devices()[0].device_kind} ({backend}); kernel config: "
        f"{config if config else 'tpu_v5e (interpret)'}; median of {iters} runs")
  print("columns per pass: ms, useful TFLOP/s; density = visited forward tiles; "
        "ratio (f/b/fb) = dense flash time / this time")
  header = (f"{'problem':24s} {'impl':26s} {'density':>8s} {'fwd':>17s} {'bwd':>17s} "
            f"{'fwd+bwd':>17s}  ratio")
  print(header)
  print("-" * len(header))
  common = dict(config=config, interpret=interpret, iters=iters, use_cupti=backend == "gpu",
                smoke=args.smoke, only=args.only, json_path=args.json)
  for p in problems(args.smoke, config):
    run_problem(p, **common)
  if args.nsa:
    nsa_rows(**common)


if __name__ == "__main__":
  main()
