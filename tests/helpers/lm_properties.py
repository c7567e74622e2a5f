"""What the recurrent language-model tests share (Mamba-1/2, hybrids, RWKV-7).

Each family's test file builds its config and random parameters; these give it
the jitted forward and decode calls of a model, random tokens, and the
property checks every recurrent family must pass (a packed document equals the
same document alone; prefill then one token per call equals the full forward).
The functions take the Flax module (hashable, so the jitted calls are cached
per model).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache
def forward_fn(model: nn.Module):
  """jit (params, tokens [b, t], segment_ids [b, t]) -> logits [b, t, v]."""
  return jax.jit(lambda params, tokens, segment_ids: model.apply(
      {"params": params}, tokens, segment_ids=segment_ids))


@functools.lru_cache
def decode_fn(model: nn.Module, last_logits_only: bool = False):
  """jit (params, cache, tokens, segment_ids) -> (logits, updated cache)."""

  def run(params, cache, tokens, segment_ids):
    logits, updated = model.apply({"params": params, "cache": cache}, tokens,
                                  segment_ids=segment_ids, decode=True,
                                  last_logits_only=last_logits_only, mutable=["cache"])
    return logits, updated["cache"]
  return jax.jit(run)


def random_tokens(seed: int, shape: tuple[int, int], vocab: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def assert_packed_equals_separate(model: nn.Module, params, tokens: jax.Array,
                                  lengths: tuple[int, ...], tol: float = 2e-5) -> None:
  """Documents of `lengths` packed in every row give the logits each gives alone."""
  batch = tokens.shape[0]
  forward = forward_fn(model)
  seg = np.repeat(np.arange(1, len(lengths) + 1), lengths)[None].repeat(batch, 0)
  packed = forward(params, tokens[:, :sum(lengths)], jnp.asarray(seg, jnp.int32))
  start = 0
  for length in lengths:
    alone = forward(params, tokens[:, start:start + length], jnp.ones((batch, length), jnp.int32))
    np.testing.assert_allclose(packed[:, start:start + length], alone, atol=tol, rtol=tol)
    start += length


def assert_prefill_then_decode_equals_forward(model: nn.Module, params, cache,
                                              tokens: jax.Array, prefill: int,
                                              tol: float = 2e-5) -> None:
  """One prefill call of `prefill` tokens, then one token per call, from the empty `cache`:
  the logits equal the full forward's (one document per row). A prefill asking for the
  last position's logits only (as the sampler does) gives that row and the same cache."""
  batch, length = tokens.shape
  ones = jnp.ones((batch, length), jnp.int32)
  full = forward_fn(model)(params, tokens, ones)
  last, last_cache = decode_fn(model, last_logits_only=True)(
      params, cache, tokens[:, :prefill], ones[:, :prefill])
  run = decode_fn(model)
  logits, cache = run(params, cache, tokens[:, :prefill], ones[:, :prefill])
  assert last.shape == (batch, 1, full.shape[-1])
  np.testing.assert_allclose(last, logits[:, -1:], atol=tol, rtol=tol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=tol, rtol=tol),
               last_cache, cache)
  pieces = [logits]
  for i in range(prefill, length):
    logits, cache = run(params, cache, tokens[:, i:i + 1], ones[:, :1])
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=tol, rtol=tol)
