"""How far the chunked WKV-7 form's logits are from the sequential scan's, on a trained model.

Random weights hide precision trouble in the chunked form: random keys are
nearly orthogonal, so the in-chunk matrices stay small. A trained RWKV-7 lines
its keys up. This loads a checkpoint written by `train.main` (e.g. configs/
rwkv_tiny.py), runs it in float32 on random token rows with `model.chunk_size`
= 0 (the token-by-token scan) and each size in --chunk_sizes, and prints the
largest logit difference per size.

    python -m train.main --config=configs/rwkv_tiny.py --workdir=/tmp/rwkv_trained
    PYTHONPATH=. python benchmarks/wkv7_chunk_accuracy.py --workdir=/tmp/rwkv_trained
"""

import argparse
import dataclasses

import jax
import numpy as np

from models.rwkv import Rwkv
from train import checkpoint


def logits(config, variables, rows: np.ndarray, chunk_size: int) -> np.ndarray:
  model = Rwkv(dataclasses.replace(config, chunk_size=chunk_size))
  return np.asarray(jax.jit(model.apply)(variables, rows))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="A train.main workdir of an rwkv model.")
  parser.add_argument("--chunk_sizes", default="16,32,64,128")
  parser.add_argument("--rows", type=int, default=4)
  parser.add_argument("--length", type=int, default=128)
  args = parser.parse_args(argv)
  family = checkpoint.load_config(args.workdir).model.family
  if family != "rwkv":
    raise SystemExit(f"--workdir={args.workdir} holds a {family!r} model; "
                     "this script measures RWKV-7's WKV.")
  model, variables = checkpoint.load_model(args.workdir)
  config = dataclasses.replace(model.config, dtype="float32")
  rows = np.random.default_rng(0).integers(
      0, config.vocab_size, (args.rows, args.length)).astype(np.int32)
  reference = logits(config, variables, rows, 0)
  print(f"float32 logits of {args.rows} x {args.length} random tokens, "
        f"up to {np.abs(reference).max():.2f} (jax {jax.__version__}, {jax.devices()[0].platform})")
  for size in (int(s) for s in args.chunk_sizes.split(",")):
    error = np.abs(logits(config, variables, rows, size) - reference).max()
    print(f"chunk_size {size:4d}: max |chunked - sequential| = {error:.2e}")


if __name__ == "__main__":
  main()
