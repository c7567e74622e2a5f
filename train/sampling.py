"""Autoregressive sampling with a KV cache: greedy, temperature, top-k, top-p.

Prompts of different lengths are left-padded into one batch; padding carries
segment id 0 so no real token attends to it. The prefill and every decode step
run inside one jitted `lax.scan`.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def filter_logits(logits: jax.Array, *, top_k: int, top_p: float) -> jax.Array:
  """Masks logits [b, v] outside the top-k tokens and the top-p nucleus to -inf."""
  neg_inf = jnp.finfo(logits.dtype).min
  if top_k:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_largest, neg_inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest logit still inside the nucleus; the top token always stays.
    keep = mass_before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg_inf, logits)
  return logits


def choose_tokens(logits: jax.Array, rng: jax.Array, *, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """Picks the next token [b] from logits [b, v]; temperature 0 is greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int):
  """Left-pads token lists into tokens, positions and segment ids, each [b, p]."""
  length = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  segments = np.zeros_like(tokens)
  for row, prompt in enumerate(prompts):
    tokens[row, length - len(prompt):] = prompt
    segments[row, length - len(prompt):] = 1
  positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
  return tokens, positions, segments


def generate_tokens(model, init_cache: Callable, variables: Any, tokens: jax.Array,
                    positions: jax.Array, segment_ids: jax.Array, rng: jax.Array, *,
                    max_new_tokens: int, temperature: float, top_k: int,
                    top_p: float) -> jax.Array:
  """Generates `max_new_tokens` after left-padded prompts.

  Args:
    model: a decoder whose `__call__` supports `decode=True` with a 'cache' and
      `last_logits_only=True` (the prefill needs the last position's logits only).
    init_cache: (model.config, batch, max_length) -> empty cache.
    variables: {'params': ..., **model_state} (no 'cache').
    tokens, positions, segment_ids: int32 [b, p] from `left_pad`.
  Returns:
    int32 [b, max_new_tokens] new tokens.
  """
  batch, prompt_len = tokens.shape
  cache = init_cache(model.config, batch, prompt_len + max_new_tokens)
  logits, updated = model.apply({**variables, "cache": cache}, tokens,
                                positions=positions, segment_ids=segment_ids,
                                decode=True, last_logits_only=True, mutable=["cache"])
  pick = functools.partial(choose_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
  rng, first_rng = jax.random.split(rng)
  first = pick(logits[:, -1], first_rng)
  ones = jnp.ones((batch, 1), jnp.int32)

  def step(carry, step_rng):
    cache, token, position = carry
    logits, updated = model.apply({**variables, "cache": cache}, token[:, None],
                                  positions=position[:, None], segment_ids=ones,
                                  decode=True, mutable=["cache"])
    next_token = pick(logits[:, -1], step_rng)
    return (updated["cache"], next_token, position + 1), next_token

  carry = (updated["cache"], first, positions[:, -1] + 1)
  _, rest = jax.lax.scan(step, carry, jax.random.split(rng, max_new_tokens - 1))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


class Sampler:
  """Text in, text out, for a model, its cache constructor and a tokenizer."""

  def __init__(self, model, init_cache: Callable, tokenizer):
    self.model = model
    self.tokenizer = tokenizer
    self._generate = jax.jit(
        functools.partial(generate_tokens, model, init_cache),
        static_argnames=("max_new_tokens", "temperature", "top_k", "top_p"))

  def __call__(self, variables, prompts: Sequence[str], sample_config) -> list[str]:
    """Completes each prompt with the model's `variables` ({'params': ..., ...});
    `sample_config` is `config.sample`."""
    tok = self.tokenizer
    encoded = [[tok.bos_id] + tok.encode(prompt) for prompt in prompts]
    max_new = int(sample_config.max_new_tokens)
    if max_new < 1:
      raise ValueError(f"sample.max_new_tokens={max_new} must be >= 1.")
    capacity = self.model.config.max_seq_len
    longest = max(len(e) for e in encoded)
    if longest + max_new > capacity:
      raise ValueError(
          f"The prompt is {longest} tokens and sample.max_new_tokens={max_new}, but the "
          f"model's max length (model.max_seq_len) is {capacity}: shorten the prompt or "
          "ask for fewer new tokens.")
    tokens, positions, segments = left_pad(encoded, tok.pad_id)
    new_tokens = self._generate(
        variables, tokens, positions, segments, jax.random.PRNGKey(sample_config.seed),
        max_new_tokens=max_new, temperature=float(sample_config.temperature),
        top_k=int(sample_config.top_k), top_p=float(sample_config.top_p))
    if not new_tokens.is_fully_addressable:  # Multi-host: every host gets every row.
      new_tokens = multihost_utils.process_allgather(new_tokens, tiled=True)
    texts = []
    for row in np.asarray(new_tokens).tolist():
      if tok.eos_id in row:
        row = row[:row.index(tok.eos_id)]
      texts.append(tok.decode(row))
    return texts
