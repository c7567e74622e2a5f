r"""Training throughput (tokens/s) and MFU of a config on the current device.

  python benchmarks/train_throughput.py --config=configs/llama_tiny.py
  python benchmarks/train_throughput.py --config=configs/llama.py:size=1b,seq_len=4096 \
      --config.data.global_batch_size=8 --steps=20

Times the jitted train step (the one `train.main` runs) on random tokens, so
the input pipeline is not measured. FLOPs per token come from the model
config through its task (`LlamaConfig.train_flops_per_token`):

  6 * N_matmul + 6 * L * h * d * T   (causal attention; PaLM appendix B)

MFU = tokens/s * FLOPs/token / (devices * peak FLOP/s). The peak is the
published dense bf16 figure of the device (`train.flops.PEAK_FLOPS`). In the
same run a large matmul in the config's compute dtype is timed as the
baseline: the FLOP/s this device actually reaches, so on CPU (no published
peak) the step can still be compared to what the hardware does. --json=PATH
also appends these numbers to a JSON-lines file.
"""

import datetime
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from train import flops
from train import state as state_lib
from train import trainer as trainer_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/llama_tiny.py", "Config.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (compilation, autotuning).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 0, "Baseline matmul size (0: by device).")
_JSON = flags.DEFINE_string("json", "", "Also append the results to this JSON-lines file.")


def random_batch(task, data_config, vocab: int, seed: int) -> dict:
  """A full global batch of random tokens in the task's layout (no padding)."""
  batch = task.dummy_batch(data_config, data_config.global_batch_size)
  rng = np.random.default_rng(seed)
  batch["inputs"] = rng.integers(3, vocab, batch["inputs"].shape, dtype=np.int32)
  batch["targets"] = rng.integers(3, vocab, batch["targets"].shape, dtype=np.int32)
  return batch


def time_calls(fn, args_list, warmup: int) -> list[float]:
  """Seconds per call after `warmup` calls, each synchronised on its outputs."""
  times = []
  for i, args in enumerate(args_list):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return times


def matmul_flops_per_second(size: int, dtype, repeats: int = 5) -> float:
  """Median FLOP/s of a [size, size] @ [size, size] matmul on the default device."""
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  a = jax.random.normal(keys[0], (size, size), dtype)
  b = jax.random.normal(keys[1], (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  times = time_calls(matmul, [(a, b)] * (repeats + 1), warmup=1)
  return 2 * size ** 3 / statistics.median(times)


def main(argv):
  del argv
  config = _CONFIG.value
  run = trainer_lib.Trainer(config, workdir="")
  d = config.data
  with run.sharding_context():
    state = state_lib.init_state(run.model, run.task, run.optimizer, run.dummy, config.seed,
                                 run.state_shardings)
  batches = [run.global_batch(random_batch(run.task, d, config.model.vocab_size, seed=i))
             for i in range(2)]

  def step(batch):
    nonlocal state
    state, metrics = run.train_step(state, batch)
    return metrics

  total = _WARMUP.value + _STEPS.value
  times = time_calls(step, [(batches[i % 2],) for i in range(total)], _WARMUP.value)
  step_s = statistics.median(times)
  tokens_per_s = d.global_batch_size * d.seq_len / step_s
  flops_per_token = run.task.train_flops_per_batch(run.model.config, d) / (
      d.global_batch_size * d.seq_len)
  achieved = tokens_per_s * flops_per_token / run.mesh.size
  device = jax.devices()[0]
  peak = flops.peak_flops_per_device(device.device_kind, config.train.peak_tflops_per_device)
  size = _MATMUL_SIZE.value or (8192 if device.platform != "cpu" else 2048)
  baseline = matmul_flops_per_second(size, jnp.dtype(config.model.dtype))

  print(f"date        {datetime.date.today()}")
  print(f"device      {run.mesh.size} x {device.device_kind} ({device.platform}), "
        f"jax {jax.__version__}")
  print(f"model       {config.model.num_layers} layers, embed {config.model.embed_dim}, "
        f"{run.model.config.matmul_params() / 1e6:.2f}M matmul params, "
        f"dtype {config.model.dtype}, "
        + ", ".join(f"{name} {value}" for name, value in kernel_choices(config.model).items()))
  print(f"batch       {d.global_batch_size} x {d.seq_len} tokens")
  print(f"step        {step_s * 1e3:.1f} ms median of {len(times)} "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
  print(f"throughput  {tokens_per_s:,.0f} tokens/s, {achieved / 1e12:.3f} TFLOP/s per device "
        f"({flops_per_token / 1e6:.2f} MFLOP/token)")
  print(f"MFU         {achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak
        else "MFU         n/a: no published peak for this device")
  print(f"baseline    {size}x{size} {config.model.dtype} matmul: {baseline / 1e12:.3f} TFLOP/s; "
        f"train step reaches {achieved / baseline:.1%} of it")
  if _JSON.value:
    row = dict(family=config.model.family, **kernel_choices(config.model),
               layers=config.model.num_layers,
               batch=d.global_batch_size, seq_len=d.seq_len, step_ms=step_s * 1e3,
               tokens_per_s=tokens_per_s, tflops_per_device=achieved / 1e12,
               mfu=achieved / peak if peak else None, matmul_tflops=baseline / 1e12)
    with open(_JSON.value, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")


def kernel_choices(model_config) -> dict:
  """The model's attention kind and kernel switches, those its family has (llama:
  attention, attention_impl; mamba: ssm_impl, attention_impl; rwkv: rwkv_impl)."""
  names = ("attention", "attention_impl", "ssm_impl", "rwkv_impl")
  return {name: model_config[name] for name in names
          if name in model_config and isinstance(model_config[name], (str, int, float, bool))}


if __name__ == "__main__":
  app.run(main)
