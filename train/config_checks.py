"""Checks that turn a bad config into an error naming the field and the fix."""

from jax.sharding import Mesh

from train import sharding


def check_run_config(config, mesh: Mesh, rules, *, process_count: int,
                     tokenizer_vocab_size: int) -> None:
  """Raises ValueError for settings that would fail later or train wrongly."""
  m, d = config.model, config.data
  tensor = mesh.shape["tensor"]
  for field in ("num_heads", "num_kv_heads"):
    if m[field] % tensor:
      raise ValueError(f"model.{field}={m[field]} is not divisible by mesh.tensor={tensor}: "
                       "choose a tensor axis size that divides the head counts.")
  experts = mesh.shape["expert"]
  if m.family == "moe" and m.num_experts % experts:
    raise ValueError(f"model.num_experts={m.num_experts} is not divisible by "
                     f"mesh.expert={experts}: each expert shard holds the same number of "
                     "experts; choose an expert axis size that divides it.")
  if m.num_heads % m.num_kv_heads:
    raise ValueError(f"model.num_heads={m.num_heads} is not divisible by "
                     f"model.num_kv_heads={m.num_kv_heads} (each kv head serves a group).")
  batch_ways = sharding.data_parallel_size(mesh, rules)
  accum = config.opt.grad_accum_steps
  if accum < 1:
    raise ValueError(f"opt.grad_accum_steps={accum} must be >= 1.")
  micro_batch = d.global_batch_size // accum
  if d.global_batch_size % accum or micro_batch % batch_ways:
    raise ValueError(
        f"data.global_batch_size={d.global_batch_size} must split into "
        f"opt.grad_accum_steps={accum} micro-batches, each divisible by the {batch_ways} "
        "data-parallel shards (mesh.data x mesh.fsdp x mesh.expert): pick a multiple of "
        f"{accum * batch_ways}.")
  if d.global_batch_size % process_count:
    raise ValueError(f"data.global_batch_size={d.global_batch_size} is not divisible by the "
                     f"{process_count} processes: each host loads an equal slice.")
  if d.seq_len > m.max_seq_len:
    raise ValueError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}.")
  if tokenizer_vocab_size > m.vocab_size:
    raise ValueError(f"The tokenizer ({d.tokenizer!r}) has {tokenizer_vocab_size} tokens but "
                     f"model.vocab_size={m.vocab_size}: raise model.vocab_size.")
  if config.train.num_steps < 1 or config.train.log_every_steps < 1:
    raise ValueError("train.num_steps and train.log_every_steps must be >= 1.")
