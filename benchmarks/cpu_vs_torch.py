r"""Treadle's train step against PyTorch eager HF `LlamaForCausalLM`, same CPU, same run.

  python benchmarks/cpu_vs_torch.py                       # float32 and bfloat16
  python benchmarks/cpu_vs_torch.py --dtypes=bfloat16 --steps=10 --repeats=7

Both sides train the shape of configs/llama_tiny.py (embed 128, 4 layers, 4
query / 2 kv heads of 32, SwiGLU 384, vocab 512, untied head) on one fixed
batch of 32 x 128 random tokens, with AdamW (b1 0.9, b2 0.95, eps 1e-8, weight
decay 0.1 on matrices only) after a global gradient-norm clip at 1.0, on the
same cores: XLA:CPU uses every core, torch gets `torch.set_num_threads(--threads)`
(default: every core). The sides start from different initialisations (HF's
normal(0, 0.02), Treadle's fan-in scaling), so their losses differ; only time
is compared.

Treadle: `train.trainer.Trainer`'s jitted step, the one `train.main` runs
(donated state, explicit shardings on a 1-device mesh, the warmup-cosine
schedule, cross entropy plus the config's z-loss and the accuracy metric). In
bfloat16 it does what configs/llama_tiny.py does: parameters and Adam moments
stay float32 (`model.param_dtype`), matmuls and activations run in bfloat16
(`model.dtype`), norms, RoPE, softmax and the loss in float32.

PyTorch: `transformers.LlamaForCausalLM` with its default attention (SDPA),
eager (no torch.compile), `torch.optim.AdamW` with the same hyper-parameters
and decay mask, `clip_grad_norm_`, a warmup-cosine `LambdaLR`, and cross
entropy on float32 logits (no z-loss, no accuracy: HF has neither). In
bfloat16 the whole model is cast with `model.to(torch.bfloat16)`, so
parameters, gradients and AdamW moments are bfloat16 too (pure bf16 training,
less work than Treadle's mixed precision). `--torch_bf16=autocast` instead
keeps float32 parameters and runs the forward under
`torch.autocast('cpu', torch.bfloat16)`, the closest match to Treadle.

Timing: after `--warmup` untimed steps per side (compilation, allocator
warmup), the sides alternate: `--steps` Treadle steps, then `--steps` torch
steps, `--repeats` times, each block synchronised at its end. Reported is
the median block time per step and the ratio torch time / Treadle time
(> 1 means Treadle is faster), of the medians and of the fastest blocks.
Alternating blocks keep the two sides under the same background load, so the
ratio survives a noisy machine better than either absolute number; on a
machine shared with other jobs torch's OpenMP threads suffer far more than
XLA's, and only the ratio of the fastest blocks means much there.
"""

import datetime
import math
import os
import statistics
import time

import jax
import numpy as np
import torch
import transformers
from absl import app
from absl import flags

from configs import llama_tiny
from train import state as state_lib
from train import trainer as trainer_lib

_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to time.")
_STEPS = flags.DEFINE_integer("steps", 5, "Train steps per timed block.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed blocks per side (alternating).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per side first.")
_THREADS = flags.DEFINE_integer("threads", 0, "torch threads (0: os.cpu_count()).")
_TORCH_BF16 = flags.DEFINE_enum("torch_bf16", "cast", ["cast", "autocast"],
                                "torch's bfloat16: model.to(bf16), or f32 params + autocast.")
_BATCH = flags.DEFINE_integer("batch", 32, "Rows per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per row.")
_SMOKE = flags.DEFINE_bool("smoke", False, "4 x 32 tokens, one block each: checks the script runs.")


def tiny_config(dtype: str, batch: int, seq_len: int):
  config = llama_tiny.get_config()
  config.model.dtype = dtype
  config.data.global_batch_size = batch
  config.data.seq_len = seq_len
  return config


def random_tokens(batch: int, seq_len: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, vocab, (batch, seq_len + 1), dtype=np.int32)
  return tokens[:, :-1], tokens[:, 1:]


class TreadleSide:
  """The trainer's jitted step on a fixed batch; `run(n)` takes n steps."""

  def __init__(self, config, inputs, targets):
    self.run_ = trainer_lib.Trainer(config, workdir="")
    batch = self.run_.task.dummy_batch(config.data, inputs.shape[0])  # [b, data.seq_len]
    batch["inputs"], batch["targets"] = inputs, targets
    with self.run_.sharding_context():
      self.state = state_lib.init_state(
          self.run_.model, self.run_.task, self.run_.optimizer, self.run_.dummy, config.seed,
          self.run_.state_shardings)
    self.batch = self.run_.global_batch(batch)

  def run(self, steps: int) -> float:
    with self.run_.sharding_context():
      for _ in range(steps):
        self.state, metrics = self.run_.train_step(self.state, self.batch)
      jax.block_until_ready((self.state, metrics))
    return float(metrics["loss"] / metrics["weight"])


def _torch_param_groups(model):
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  return decay, no_decay


class TorchSide:
  """HF LlamaForCausalLM of the same shape, eager, AdamW + clipping."""

  def __init__(self, config, inputs, targets, bf16_mode: str):
    m, o = config.model, config.opt
    hf_config = transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.embed_dim, intermediate_size=m.mlp_dim,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim,
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        attention_bias=False, mlp_bias=False)
    torch.manual_seed(config.seed)
    self.model = transformers.LlamaForCausalLM(hf_config)
    self.model.train()
    self.autocast = m.dtype == "bfloat16" and bf16_mode == "autocast"
    if m.dtype == "bfloat16" and not self.autocast:
      self.model.to(torch.bfloat16)
    decay, no_decay = _torch_param_groups(self.model)
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    warmup, total = o.warmup_steps, config.train.num_steps

    def lr_factor(step):
      if step < warmup:
        return step / warmup
      progress = min((step - warmup) / max(total - warmup, 1), 1.0)
      return o.end_lr_factor + (1 - o.end_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
    self.clip_norm = o.clip_norm
    self.inputs = torch.from_numpy(inputs.astype(np.int64))
    self.targets = torch.from_numpy(targets.astype(np.int64))

  def step(self) -> torch.Tensor:
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=self.autocast):
      logits = self.model(input_ids=self.inputs).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), self.targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
    self.optimizer.step()
    self.scheduler.step()
    return loss

  def run(self, steps: int) -> float:
    for _ in range(steps):
      loss = self.step()
    return float(loss.detach())


def timed(side, steps: int) -> tuple[float, float]:
  """(seconds per step, last loss) of one block of `steps` steps."""
  start = time.perf_counter()
  loss = side.run(steps)
  return (time.perf_counter() - start) / steps, loss


def main(argv):
  del argv
  threads = _THREADS.value or os.cpu_count()
  torch.set_num_threads(threads)
  batch, seq_len = _BATCH.value, _SEQ_LEN.value
  steps, repeats, warmup = _STEPS.value, _REPEATS.value, _WARMUP.value
  if _SMOKE.value:
    batch, seq_len, steps, repeats, warmup = 4, 32, 1, 1, 1
  tokens_per_step = batch * seq_len
  print(f"date     {datetime.date.today()}")
  print(f"device   {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} cores; torch threads {torch.get_num_threads()}")
  print(f"versions jax {jax.__version__}, jaxlib {jax.lib.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}")
  print(f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}")
  print(f"shape    configs/llama_tiny.py, batch {batch} x {seq_len}; "
        f"{repeats} alternating blocks of {steps} steps; torch bf16: "
        f"{_TORCH_BF16.value}")
  for dtype in _DTYPES.value:
    config = tiny_config(dtype, batch, seq_len)
    inputs, targets = random_tokens(batch, seq_len, config.model.vocab_size)
    sides = {"treadle": TreadleSide(config, inputs, targets),
             "torch": TorchSide(config, inputs, targets, _TORCH_BF16.value)}
    for side in sides.values():
      side.run(warmup)
    times = {name: [] for name in sides}
    losses = {}
    for _ in range(repeats):
      for name, side in sides.items():
        seconds, losses[name] = timed(side, steps)
        times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{dtype}")
    for name in sides:
      t = times[name]
      print(f"  {name:8s} {median[name] * 1e3:7.1f} ms/step (min {min(t) * 1e3:.1f}, "
            f"max {max(t) * 1e3:.1f}), {tokens_per_step / median[name]:9,.0f} tokens/s, "
            f"last loss {losses[name]:.3f}")
    fastest = {name: min(t) for name, t in times.items()}
    print(f"  ratio    {median['torch'] / median['treadle']:.2f}x of the medians, "
          f"{fastest['torch'] / fastest['treadle']:.2f}x of the fastest blocks "
          "(Treadle tokens/s / torch tokens/s)")


if __name__ == "__main__":
  app.run(main)
