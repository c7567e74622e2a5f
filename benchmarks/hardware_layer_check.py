"""The Pallas kernels as the layers call them, against the layers' XLA path, on this device.

    python benchmarks/hardware_layer_check.py --case=attention_d64     # one case, real sizes
    python benchmarks/hardware_layer_check.py --smoke --case=nsa_d64   # tiny, interpreted on CPU

A stage of benchmarks/hardware_check.py, which runs each case in its own
process. A case runs one layer function twice on the same random bfloat16
inputs: with attention_impl='pallas' (the kernels a model runs on this chip:
Mosaic GPU on Hopper, Mosaic TPU on TPUs, interpreted on CPU) and with 'xla'
(the einsum path), forward and gradients. It compares every output and
gradient by ||pallas - xla|| / ||xla|| and max|pallas - xla| / max|xla|; both
paths round to bfloat16, so a few 1e-3 is expected and a wrong tile shows as
a large max.

Cases (real sizes; --smoke shrinks lengths, heads and blocks):
  attention_d64       Llama 1B's attention (layers.attention): causal, GQA
                      4:1, head_dim 64, packed segments, t 4096
  attention_d128      3B/8B and the MoE configs: GQA 4:1, head_dim 128, segments
  attention_mha_d128  Qwen2-MoE: no GQA, head_dim 128, one segment
  nsa_d64             NativeSparseAttention with Llama 1B's GQA 4:1 and head_dim
                      64 (defaults: compression 32/16, top-16 blocks of 64,
                      window 512), segments: the selection kernels and the
                      flash window
  nsa_d128            NSA with 16 query heads per kv head, head_dim 128
The kernels' tiles depend on head_dim and the GQA group, not on the number of
heads, so the cases keep 16 query heads: the XLA path's [t, s] scores stay small.

Prints one line per compared tensor; --json=PATH appends one row per case.
Exit status 1 when a case is outside tolerance or not finite.
"""

import argparse
import dataclasses
import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The project modules this check depends on (update here when they move).
from layers.attention import NativeSparseAttention, dot_product_attention
from pallas_kernels.common.config import chip_of_device

# ||pallas - xla|| / ||xla|| and max|pallas - xla| / max|xla|, both bfloat16.
REL_NORM_TOL = 2e-2
REL_MAX_TOL = 5e-2


@dataclasses.dataclass(frozen=True)
class Case:
  """One layer geometry: b batch, t length, h / k query / kv heads, d head dim."""
  layer: str  # 'attention' | 'nsa'
  b: int
  t: int
  h: int
  k: int
  d: int
  segments: int  # packed documents per row (1: one segment)
  nsa: tuple = ()  # NativeSparseAttention overrides, (name, value) pairs


CASES = {
    "attention_d64": Case("attention", b=1, t=4096, h=16, k=4, d=64, segments=3),
    "attention_d128": Case("attention", b=1, t=4096, h=16, k=4, d=128, segments=3),
    "attention_mha_d128": Case("attention", b=1, t=4096, h=16, k=16, d=128, segments=1),
    "nsa_d64": Case("nsa", b=1, t=4096, h=16, k=4, d=64, segments=2),
    "nsa_d128": Case("nsa", b=1, t=4096, h=16, k=1, d=128, segments=2),
}

# --smoke: short rows, few heads, a few NSA blocks (of 64: the Mosaic GPU multiple).
SMOKE_NSA = (("compress_block", 32), ("compress_stride", 16), ("select_block", 64),
             ("select_top_n", 3), ("window", 64))


def smoke_case(case: Case) -> Case:
  return dataclasses.replace(case, t=256, h=4, k=min(case.k, 2),
                             nsa=SMOKE_NSA if case.layer == "nsa" else ())


def segment_ids(b: int, t: int, n: int) -> jax.Array:
  """int32 [b, t]: n contiguous documents of random lengths, ids 1..n (no padding)."""
  cuts = np.sort(np.random.default_rng(n).choice(np.arange(t // 8, t - t // 8), n - 1,
                                                 replace=False))
  ids = 1 + np.searchsorted(cuts, np.arange(t), side="right")
  return jnp.asarray(np.broadcast_to(ids, (b, t)), jnp.int32)


def attention_outputs(case: Case, impl: str, chip: str):
  """{name: array}: dot_product_attention's output and dq, dk, dv for a fixed cotangent."""
  keys = jax.random.split(jax.random.key(0), 4)
  bf16 = jnp.bfloat16
  q = jax.random.normal(keys[0], (case.b, case.t, case.h, case.d), bf16)
  k = jax.random.normal(keys[1], (case.b, case.t, case.k, case.d), bf16)
  v = jax.random.normal(keys[2], (case.b, case.t, case.k, case.d), bf16)
  do = jax.random.normal(keys[3], q.shape, bf16)
  ids = segment_ids(case.b, case.t, case.segments) if case.segments > 1 else None
  interpret = jax.default_backend() == "cpu"

  def both(q, k, v, do):
    fn = lambda q, k, v: dot_product_attention(  # noqa: E731
        q, k, v, impl=impl, q_segment_ids=ids, kv_segment_ids=ids, interpret=interpret,
        chip=chip)
    out, vjp = jax.vjp(fn, q, k, v)
    return dict(zip(("out", "dq", "dk", "dv"), (out, *vjp(do))))
  return jax.jit(both)(q, k, v, do)


def nsa_outputs(case: Case, impl: str, chip: str):
  """{name: array}: the NSA layer's output, input gradient and every parameter gradient."""
  embed = 1024 if case.t > 256 else 64
  layer = NativeSparseAttention(num_heads=case.h, num_kv_heads=case.k, head_dim=case.d,
                                attention_impl=impl, attention_chip=chip, dtype=jnp.bfloat16,
                                **dict(case.nsa))
  keys = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(keys[0], (case.b, case.t, embed), jnp.bfloat16)
  cotangent = jax.random.normal(keys[1], x.shape, jnp.bfloat16)
  ids = segment_ids(case.b, case.t, case.segments) if case.segments > 1 else None
  reference = layer.clone(attention_impl="xla", attention_chip="")
  params = nn.unbox(jax.jit(reference.init)(keys[2], x))["params"]

  def run(params, x):
    out, vjp = jax.vjp(lambda p, x: layer.apply({"params": p}, x, segment_ids=ids), params, x)
    grad_params, grad_x = vjp(cotangent)
    named = {"out": out, "dx": grad_x}
    for path, leaf in jax.tree_util.tree_leaves_with_path(grad_params):
      named["d" + "/".join(str(getattr(p, "key", p)) for p in path)] = leaf
    return named
  return jax.jit(run)(params, x)


def compare(got: dict, want: dict) -> list[tuple[str, float, float]]:
  """[(name, rel_norm, rel_max)] of got against want, in float32."""
  rows = []
  for name, w in want.items():
    g = np.asarray(got[name], np.float32)
    w = np.asarray(w, np.float32)
    diff = np.abs(g - w)
    rel_norm = float(np.linalg.norm(diff) / max(np.linalg.norm(w), 1e-30))
    rel_max = float(diff.max() / max(np.abs(w).max(), 1e-30))
    if not np.all(np.isfinite(g)):
      rel_norm = rel_max = float("nan")
    rows.append((name, rel_norm, rel_max))
  return rows


def run_case(name: str, smoke: bool) -> dict:
  """Runs one case; prints a line per tensor and returns the case's summary row."""
  case = smoke_case(CASES[name]) if smoke else CASES[name]
  chip = chip_of_device(jax.devices()[0]) or ""
  outputs = attention_outputs if case.layer == "attention" else nsa_outputs
  start = time.perf_counter()
  got = jax.block_until_ready(outputs(case, "pallas", chip))
  pallas_s = time.perf_counter() - start
  want = jax.block_until_ready(outputs(case, "xla", chip))
  rows = compare(got, want)
  score = lambda row: max(row[1] / REL_NORM_TOL, row[2] / REL_MAX_TOL)  # noqa: E731
  worst = max(rows, key=lambda row: score(row) if np.isfinite(score(row)) else np.inf)
  ok = all(score(row) < 1 for row in rows)  # NaN fails.
  print(f"{name}: {case}, chip {chip or 'none (interpret)'}")
  for tensor, rel_norm, rel_max in rows:
    print(f"  {tensor:48s} rel_norm {rel_norm:9.2e}  rel_max {rel_max:9.2e}")
  print(f"{name}: {'ok' if ok else 'MISMATCH'} (worst {worst[0]}: rel_max {worst[2]:.2e}; "
        f"tolerance rel_norm {REL_NORM_TOL:g}, rel_max {REL_MAX_TOL:g})")
  return dict(case=name, ok=ok, chip=chip or "interpret", t=case.t, heads=f"{case.h}:{case.k}",
              head_dim=case.d, tensors=len(rows), worst=worst[0], worst_rel_max=worst[2],
              max_rel_norm=float(np.max([r[1] for r in rows])),  # NaN stays NaN.
              pallas_compile_and_run_s=pallas_s)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", required=True, choices=sorted(CASES))
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (interpreted on CPU)")
  parser.add_argument("--json", default="", help="append the case's row to this JSON-lines file")
  args = parser.parse_args()
  row = run_case(args.case, args.smoke)
  if args.json:
    with open(args.json, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
  sys.exit(0 if row["ok"] else 1)


if __name__ == "__main__":
  main()
