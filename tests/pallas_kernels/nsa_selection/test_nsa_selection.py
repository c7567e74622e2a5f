"""Selected-block attention kernels (interpret mode) against the plain-jnp reference, and lowering.

TPU and Mosaic GPU kernels (forward, dq, dkv each); by default one
representative case of each and one lowering each, the sweeps with -m slow.

Every case checks the output and the q, k, v gradients on random block tables
with unused slots (-1) and blocks after the query (skipped). Interpreted
outputs start as NaN, so a dk/dv block the pair list never visits would fail.
"""

import dataclasses

import jax
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import config as config_lib
from pallas_kernels.common import gpu as gpu_ops
from pallas_kernels.nsa_selection import (selected_block_attention,
                                          selected_block_attention_reference)
from pallas_kernels.nsa_selection import gpu_bwd
from pallas_kernels.nsa_selection import tpu_core
from pallas_kernels.nsa_selection.tpu import Geometry

from helpers.kernels import export_for_chip, value_and_grads

_TOL = {jnp.float32: 5e-5, jnp.bfloat16: 3e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  b: int = 2
  t: int = 37
  s: int = 37
  h: int = 4
  kh: int = 2
  d: int = 16
  block: int = 8
  n: int = 3
  segments: bool = False
  dtype: type = jnp.float32

  def inputs(self, seed: int):
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (self.b, self.t, self.h, self.d), self.dtype)
    k = jax.random.normal(keys[1], (self.b, self.s, self.kh, self.d), self.dtype)
    v = jax.random.normal(keys[2], (self.b, self.s, self.kh, self.d), self.dtype)
    nb = -(-self.s // self.block)
    # Distinct blocks per (query, kv head) in random order, ~20% unused slots.
    order = jnp.argsort(jax.random.uniform(keys[3], (self.b, self.t, self.kh, nb)), axis=-1)
    idx = order[..., :self.n].astype(jnp.int32)
    idx = jnp.where(jax.random.uniform(keys[4], idx.shape) < 0.2, -1, idx)
    kw = {}
    if self.segments:
      cut = self.t // 2
      ids = (jnp.arange(self.t) >= cut).astype(jnp.int32) + 1
      ids = jnp.broadcast_to(ids, (self.b, self.t))
      kw = dict(q_segment_ids=ids, kv_segment_ids=ids)
    do = jax.random.normal(keys[5], q.shape, self.dtype)
    return (q, k, v), idx, kw, do


def _slow(case):
  return pytest.param(case, marks=pytest.mark.slow)


CASES = [
    Case(segments=True, n=4),  # the default representative: GQA 2, segments, unused slots
    _slow(Case()),
    _slow(Case(h=4, kh=4, n=1, block=16)),  # MHA, one slot
    _slow(Case(h=8, kh=2, n=5, t=29, s=29)),  # GQA 4, all blocks can be chosen
    _slow(Case(h=2, kh=1, n=2, t=41, s=53, block=16)),  # MQA, more keys than queries
]


def _run(case: Case, seed: int, interpret=True, config=None):
  """((out, dq, dk, dv) of the kernels, the same of the reference) on case's inputs."""
  (q, k, v), idx, kw, do = case.inputs(seed)
  fn = lambda q, k, v: selected_block_attention(  # noqa: E731
      q, k, v, idx, block_size=case.block, interpret=interpret, config=config, **kw)
  ref = lambda q, k, v: selected_block_attention_reference(  # noqa: E731
      q, k, v, idx, block_size=case.block, **kw)
  return value_and_grads(fn, (q, k, v), do), value_and_grads(ref, (q, k, v), do)


def _close(got, want, dtype):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got))
  err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
  assert err < _TOL[dtype], err


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case):
  got, want = _run(case, seed=0)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert np.max(np.abs(np.asarray(w))) > 0, name  # the case exercises this output
    _close(g, w, case.dtype)


@pytest.mark.slow
def test_bfloat16():
  case = Case(dtype=jnp.bfloat16, h=4, kh=2, n=3)
  got, want = _run(case, seed=1)
  for g, w in zip(got, want):
    _close(g, w, case.dtype)


@pytest.mark.slow
def test_strict_interpreter():
  """NaN memory, out-of-bounds reads raise, races detected."""
  params = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise",
                                 detect_races=True)
  case = Case(b=1, t=19, s=19, n=2, segments=True)
  got, want = _run(case, seed=2, interpret=params)
  for g, w in zip(got, want):
    _close(g, w, case.dtype)


def test_long_sequences_run_in_query_chunks(monkeypatch):
  """With SMEM room for 10 queries' tables, 37 queries run as 4 chunks (the last one
  padded) through the forward, dq and the dk/dv sum over chunks; no room is an error."""
  case = Case(segments=True, n=4)
  geo = dataclasses.replace(_geometry(case), q_len=case.t)
  fixed = 2 * case.b * case.kh * geo.num_blocks + 1
  per_query = 2 * case.b * case.kh * case.n + case.b
  monkeypatch.setattr(tpu_core, "SMEM_PREFETCH_WORDS", fixed + 10 * per_query)
  assert tpu_core.query_chunk(case.b, geo) == 10
  got, want = _run(case, seed=8)
  for g, w in zip(got, want):
    _close(g, w, case.dtype)
  monkeypatch.setattr(tpu_core, "SMEM_PREFETCH_WORDS", fixed + per_query - 1)
  with pytest.raises(ValueError, match="shard the batch"):
    _run(case, seed=8)


def _geometry(case: Case):
  nb = -(-case.s // case.block)
  return Geometry(block=case.block, q_len=case.t, kv_len=case.s, padded_kv_len=nb * case.block,
                  num_kv_heads=case.kh, group=case.h // case.kh, top_n=case.n, scale=1.0,
                  has_segments=case.segments)


@pytest.mark.slow
def test_unchosen_blocks_get_zero_gradient():
  """Blocks no query selects: dk = dv = 0 exactly (their pair-list no-ops write zeros)."""
  case = Case(b=1, t=40, s=40, n=1)
  (q, k, v), _, _, do = case.inputs(3)
  idx = jnp.zeros((1, 40, 2, 1), jnp.int32)  # everyone picks block 0
  fn = lambda q, k, v: selected_block_attention(  # noqa: E731
      q, k, v, idx, block_size=8, interpret=True)
  _, _, dk, dv = value_and_grads(fn, (q, k, v), do)
  assert np.all(np.asarray(dk[:, 8:]) == 0) and np.all(np.asarray(dv[:, 8:]) == 0)
  assert np.max(np.abs(np.asarray(dv[:, :8]))) > 0


def test_rejects_bad_inputs():
  q = jnp.zeros((1, 8, 4, 16))
  k = jnp.zeros((1, 8, 2, 16))
  idx = jnp.zeros((1, 8, 2, 1), jnp.int32)
  with pytest.raises(ValueError, match="block_indices must be"):
    selected_block_attention(q, k, k, idx[:, :, :1], block_size=8, interpret=True)
  h100 = config_lib.FlashAttentionConfig("h100")
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    selected_block_attention(q, k, k, idx, block_size=16, config=h100)
  with pytest.raises(ValueError, match="head_dim=16 must be a multiple of 64"):
    selected_block_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                             k.astype(jnp.bfloat16), idx, block_size=16, config=h100)
  with pytest.raises(ValueError, match="multiple of 8"):
    selected_block_attention(q, k, k, idx, block_size=12,
                             config=config_lib.FlashAttentionConfig("tpu_v5e"))


GPU_CASES = [
    Case(b=1, t=80, s=80, d=64, block=64, n=2, segments=True, dtype=jnp.bfloat16),
    _slow(Case(b=2, t=70, s=140, h=8, kh=1, d=64, block=64, n=2, dtype=jnp.bfloat16)),  # MQA
]


@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_kernel_matches_reference(case, monkeypatch):
  """Mosaic GPU forward, dq and dk/dv kernels, interpreted (NaN-filled SMEM, out-of-bounds
  reads raise), through the public entry point with an h100 config. Few pairs per dk/dv
  CTA, so the busiest blocks are split across CTAs and their partials summed."""
  monkeypatch.setattr(gpu_bwd, "PAIRS_PER_CTA", 16)
  got, want = _run_gpu(case, seed=4, interpret=True)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert np.max(np.abs(np.asarray(w, np.float32))) > 0, name
    _close(g, w, case.dtype)


def test_gpu_work_items_cover_every_active_pair_once():
  """The dk/dv work list: each item walks <= C pairs of one block, every active (block,
  query) pair is walked by exactly one item, and inactive slots by none."""
  rng = np.random.default_rng(0)
  b, kh, t, n, nb, c = 2, 3, 40, 4, 6, 5
  blk = rng.integers(0, nb, (b, kh, t, n)).astype(np.int32)
  act = (rng.random((b, kh, t, n)) < 0.7).astype(np.int32)
  act[0, 0, :, 0] = 1
  blk[0, 0, :, 0] = 0  # one block every query selects: split over ceil(t / c) items.
  pair_q, item_block, lo, hi = map(np.asarray, gpu_bwd.work_items(
      jnp.asarray(blk), jnp.asarray(act), num_blocks=nb, pairs_per_cta=c))
  assert item_block.shape[-1] == nb + -(-t * n // c)
  for i in range(b):
    for j in range(kh):
      want = sorted((blk[i, j, q, s], q) for q in range(t) for s in range(n) if act[i, j, q, s])
      got = []
      for w in range(item_block.shape[-1]):
        assert 0 <= hi[i, j, w] - lo[i, j, w] <= c
        got += [(item_block[i, j, w], pair_q[i, j, p]) for p in range(lo[i, j, w], hi[i, j, w])]
      assert all(m < nb for m, _ in got)
      assert sorted(got) == want


@pytest.mark.slow
def test_gpu_kernel_has_no_races():
  """Forward, dq and dk/dv under the interpreter's race detector."""
  case = Case(b=1, t=80, s=80, d=64, block=64, n=2, segments=True, dtype=jnp.bfloat16)
  params = dataclasses.replace(gpu_ops.interpret_params(), detect_races=True)
  got, want = _run_gpu(case, seed=5, interpret=params)
  for g, w in zip(got, want):
    _close(g, w, case.dtype)


def _run_gpu(case: Case, seed: int, interpret):
  return _run(case, seed, interpret, config=config_lib.FlashAttentionConfig("h100"))


def _export(chip: str, head_dim: int, group: int, segments: bool):
  """jax.export of the forward and VJP for the chip's platform, on this CPU machine."""
  cfg = config_lib.default_config(chip)
  b, t, kv_heads, n, block = 1, 1000, 2, 16, 64
  sd = jax.ShapeDtypeStruct
  args = [sd((b, t, kv_heads * group, head_dim), jnp.bfloat16),
          sd((b, t, kv_heads, head_dim), jnp.bfloat16),
          sd((b, t, kv_heads, head_dim), jnp.bfloat16), sd((b, t, kv_heads, n), jnp.int32)]
  if segments:
    args.append(sd((b, t), jnp.int32))

  def attend(q, k, v, idx, ids=None):
    return selected_block_attention(q, k, v, idx, block_size=block, q_segment_ids=ids,
                                    kv_segment_ids=ids, config=cfg)
  return export_for_chip(chip, attend, args)


@pytest.mark.parametrize("chip, head_dim, group, segments", [
    ("h100", 128, 16, True),
    ("tpu_v5e", 128, 16, True),
    pytest.param("h200", 64, 1, False, marks=pytest.mark.slow),
    pytest.param("h100", 256, 64, True, marks=pytest.mark.slow),
    pytest.param("tpu_v5e", 64, 1, False, marks=pytest.mark.slow),
    pytest.param("tpu_v6e", 128, 8, False, marks=pytest.mark.slow)])
def test_lowers(chip, head_dim, group, segments):
  """Forward, dq and dk/dv lower to three Mosaic GPU (shared memory checked) or Mosaic TPU
  custom calls; compilation to the chip happens on hardware."""
  text = _export(chip, head_dim, group, segments).mlir_module()
  call = {"gpu": "@mosaic_gpu_v2", "tpu": "@tpu_custom_call"}[
      config_lib.default_config(chip).platform]
  assert text.count(call) == 3


HARDWARE_CASES = [
    Case(b=1, t=2000, s=2000, h=16, kh=2, d=128, block=64, n=16, segments=True,
         dtype=jnp.bfloat16),
    Case(b=2, t=1100, s=1300, h=8, kh=8, d=64, block=64, n=4, dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("platform", [pytest.param("gpu", marks=pytest.mark.gpu),
                                      pytest.param("tpu", marks=pytest.mark.tpu)])
@pytest.mark.parametrize("case", HARDWARE_CASES, ids=str)
def test_kernels_on_hardware(case, platform):
  """The real kernels (forward, dq, dk/dv) on a Hopper GPU or a TPU, against the f32 reference."""
  chip = config_lib.chip_of_device(jax.devices()[0])
  if chip is None or config_lib.default_config(chip).platform != platform:
    pytest.skip(f"needs a {platform.upper()} kernel target; have {jax.devices()[0].device_kind}")
  got, want = _run(case, seed=6, interpret=False, config=config_lib.default_config(chip))
  for g, w in zip(got, want):
    _close(g, w, case.dtype)
