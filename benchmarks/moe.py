"""MoE layer benchmark: dropless grouped matmul vs capacity dispatch vs a dense SwiGLU.

    python -m benchmarks.moe            # the issue's H100 shape: 8k tokens, e 4096, 8 experts top-2
    python -m benchmarks.moe --smoke    # tiny sizes, for CPU

One layer, forward + backward (gradients of params and input for a random
output cotangent), on the current default device. Rows:
  dropless   MoeFeedForward(impl="dropless"): sort + grouped matmul (ragged_dot; tiled on CPU).
  capacity   MoeFeedForward(impl='capacity', --capacity_factor): fixed buffers.
  dense      SwiGLU with hidden k * m: the same active parameters per token.
Both MoE rows include the router and the load statistics.

FLOPs counted (model FLOPs, fwd + bwd = 3x fwd): 3 * 2 * 3 * tokens * e * m * k
for every row (the router and the capacity padding are not counted), so the
TFLOP/s column compares useful work.

Timing: two random input sets alternated, --warmup runs of each, then the
median wall clock of --iters runs after block_until_ready. --json=PATH also
appends each row to a JSON-lines file.
"""

import argparse
import datetime
import json
import statistics
import time

import jax
import jax.numpy as jnp

from layers.mlp import SwiGLU
from layers.moe import MoeFeedForward


def _layers(args, dtype):
  kw = dict(dtype=dtype, param_dtype=jnp.float32)
  moe = dict(num_experts=args.experts, num_experts_per_token=args.topk,
             expert_mlp_dim=args.mlp, capacity_factor=args.capacity_factor, **kw)
  return {
      "dropless": MoeFeedForward(impl="dropless", **moe),
      "capacity": MoeFeedForward(impl="capacity", **moe),
      "dense": SwiGLU(args.topk * args.mlp, **kw),
  }


def _step(layer):
  """jitted fwd+bwd: (variables, x, dy) -> (grads of params, grad of x, dropped)."""
  def run(variables, x, dy):
    def f(params, x):
      y, state = layer.apply({**variables, "params": params}, x, mutable=["moe_stats"])
      return y, state.get("moe_stats", {}).get("dropped", jnp.zeros(()))
    _, vjp, dropped = jax.vjp(f, variables["params"], x, has_aux=True)
    return vjp(dy), dropped
  return jax.jit(run)


def _time(fn, arg_sets, warmup: int, iters: int) -> float:
  for args in arg_sets:
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times = []
  for i in range(iters):
    args = arg_sets[i % len(arg_sets)]
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch x seq)")
  parser.add_argument("--seq", type=int, default=2048, help="sequence length (capacity groups)")
  parser.add_argument("--embed", type=int, default=4096)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--topk", type=int, default=2)
  parser.add_argument("--mlp", type=int, default=14336, help="hidden width of each expert")
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
  parser.add_argument("--json", default="", help="also append each row to this JSON-lines file")
  args = parser.parse_args()
  if args.smoke:
    args.tokens, args.seq, args.embed, args.mlp = 512, 128, 64, 128
    args.iters, args.warmup = min(args.iters, 5), 1
  if args.tokens % args.seq:
    parser.error(f"--tokens={args.tokens} must be a multiple of --seq={args.seq}")
  dtype = jnp.dtype(args.dtype)
  batch = args.tokens // args.seq

  device = jax.devices()[0]
  print(f"# MoE layer fwd+bwd | {device.platform} {device.device_kind} | jax {jax.__version__} | "
        f"{datetime.date.today().isoformat()}")
  print(f"# tokens {args.tokens} (batch {batch} x seq {args.seq}), embed {args.embed}, "
        f"experts {args.experts} top-{args.topk}, expert mlp {args.mlp}, {dtype.name}, "
        f"capacity factor {args.capacity_factor}, median of {args.iters}")
  flops = 3 * 2 * 3 * args.tokens * args.embed * args.mlp * args.topk
  keys = jax.random.split(jax.random.key(0), 5)
  arg_sets = [(jax.random.normal(keys[i], (batch, args.seq, args.embed), dtype),
               jax.random.normal(keys[i + 2], (batch, args.seq, args.embed), dtype))
              for i in range(2)]
  print(f"| {'impl':<9} | {'ms':>9} | {'TFLOP/s':>8} | {'dropped':>8} |")
  print(f"|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 10}|")
  for name, layer in _layers(args, dtype).items():
    variables = layer.init(keys[4], arg_sets[0][0])
    variables = {k: v for k, v in variables.items() if k != "moe_stats"}
    step = _step(layer)
    ms = _time(lambda x, dy: step(variables, x, dy), arg_sets, args.warmup, args.iters)
    _, dropped = step(variables, *arg_sets[0])
    total = args.tokens * args.topk
    drop = f"{float(dropped) / total:7.1%}" if name == "capacity" else "-"
    print(f"| {name:<9} | {ms:9.2f} | {flops / ms / 1e9:8.3g} | {drop:>8} |", flush=True)
    if args.json:
      with open(args.json, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(impl=name, tokens=args.tokens, ms=ms, tflops=flops / ms / 1e9,
                                dropped=float(dropped) / total if name == "capacity" else None))
                + "\n")


if __name__ == "__main__":
  main()
