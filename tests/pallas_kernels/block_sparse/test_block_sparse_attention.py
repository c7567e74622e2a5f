"""Block-sparse attention: masks, block maps, and kernel numerics in interpret mode.

Masks are checked against their defining formulas, and every tile kind they
claim (SKIP / FULL) against the dense mask. Block maps must reproduce the
dense mask exactly from their entries. Kernels (TPU kind under Pallas' HLO
interpreter, GPU kind under jax's Mosaic GPU interpreter; both start outputs
and scratch as NaN, so an unwritten block fails) are compared, output and
gradients of q, k, v, with the plain-jnp dense reference on fresh random
inputs. Small tiles make short sequences span many tiles.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import (BlockMap, BlockMask, CausalMask, ChunkedCausalMask,
                                         FullMask, LocalMask, PrefixLMMask,
                                         block_sparse_attention,
                                         block_sparse_attention_reference, build_block_map,
                                         random_block_mask)
from pallas_kernels.block_sparse import masks as masks_lib
from pallas_kernels.common import config as config_lib
from pallas_kernels.common.config import FlashAttentionConfig

from helpers.kernels import FAST_COMPILE, random_attention_inputs, value_and_grads

SMALL_TPU = FlashAttentionConfig("tpu_v5e", block_q=16, block_kv=16, block_q_dq=16,
                                 block_kv_dq=8, block_q_dkv=8, block_kv_dkv=16)
SMALL_GPU = FlashAttentionConfig("h100", block_q=64, block_kv=64, block_q_dq=64,
                                 block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64,
                                 max_concurrent_steps=2, compute_wgs_bwd=1)
_TOL = {jnp.float32: 5e-5, jnp.bfloat16: 3e-2}


# ----------------------------------------------------------------------------- masks

def _formula(name, i, j):
  return {"causal": j <= i, "local": (j >= i - 5) & (j <= i + 2),
          "chunked": (j <= i) & (i // 7 == j // 7), "prefix": (j < 9) | (j <= i),
          "full": np.ones_like(i + j, bool)}[name]


MASK_OBJECTS = {"causal": CausalMask(), "local": LocalMask(5, 2), "chunked": ChunkedCausalMask(7),
                "prefix": PrefixLMMask(9), "full": FullMask()}


@pytest.mark.parametrize("name", sorted(MASK_OBJECTS))
def test_mask_dense_matches_formula(name):
  i, j = np.arange(23)[:, None], np.arange(31)[None, :]
  np.testing.assert_array_equal(MASK_OBJECTS[name].dense(23, 31), _formula(name, i, j))


def test_composition_hash_and_block_mask_dense():
  i, j = np.arange(40)[:, None], np.arange(40)[None, :]
  both = CausalMask() & LocalMask(5, 2) | PrefixLMMask(9)
  np.testing.assert_array_equal(both.dense(40, 40), (_formula("causal", i, j)
                                                     & _formula("local", i, j))
                                | _formula("prefix", i, j))
  assert hash(both) == hash(CausalMask() & LocalMask(5, 2) | PrefixLMMask(9))
  assert both == CausalMask() & LocalMask(5, 2) | PrefixLMMask(9) != CausalMask()
  blocks = np.random.default_rng(0).random((3, 4, 5)) < 0.5
  bm = BlockMask(blocks, (8, 4))
  dense = bm.dense(30, 19, num_heads=3)
  np.testing.assert_array_equal(dense, blocks[:, i[:30] // 8, j[:, :19] // 4])
  assert bm == BlockMask(blocks.copy(), (8, 4)) and hash(bm) == hash(BlockMask(blocks, (8, 4)))
  assert bm != BlockMask(~blocks, (8, 4))
  assert not bm.dense(40, 40, num_heads=3)[:, 32:].any()  # Past the pattern: nothing.


def test_tile_kinds_never_wrong():
  """SKIP tiles have no visible pair, FULL tiles only visible pairs (random tiles)."""
  rng = np.random.default_rng(1)
  blocks = rng.random((1, 9, 9)) < 0.4
  cases = [*MASK_OBJECTS.values(), BlockMask(blocks, 6), LocalMask(-3, 8),
           CausalMask() & BlockMask(blocks, 6) | ChunkedCausalMask(5)]
  for mask in cases:
    dense = mask.dense(54, 54)
    r0, c0 = rng.integers(0, 54, (2, 300))
    r1, c1 = np.minimum(r0 + rng.integers(0, 20, 300), 53), np.minimum(c0 + rng.integers(0, 20, 300), 53)
    kinds = mask.tile_kinds(r0, r1, c0, c1)
    for n in range(300):
      tile = dense[r0[n]:r1[n] + 1, c0[n]:c1[n] + 1]
      assert kinds[n] != masks_lib.SKIP or not tile.any(), (mask, n)
      assert kinds[n] != masks_lib.FULL or tile.all(), (mask, n)
    assert (kinds != masks_lib.PARTIAL).mean() > 0.2 or isinstance(mask, masks_lib.OrMask)


@pytest.mark.parametrize("make, match", [
    (lambda: LocalMask(1.5, 0), "LocalMask left"),
    (lambda: ChunkedCausalMask(0), "chunk"),
    (lambda: PrefixLMMask(-1), "prefix_len"),
    (lambda: BlockMask(np.ones((2, 2)), 4), "bool"),
    (lambda: BlockMask(np.ones((2, 2), bool), 0), "block_size"),
    (lambda: BlockMask(np.ones((2, 2, 2), bool), 4) & BlockMask(np.ones((3, 2, 2), bool), 4),
     "heads"),
])
def test_mask_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# ------------------------------------------------------------------------- block maps

def _rebuild(kmap, *, q_len, kv_len, head=0, num_q_tiles=None, group_head=0):
  rows, cols = kmap.block_rows, kmap.block_cols
  dense = np.zeros((kmap.num_rows * rows, (num_q_tiles or 4096) * cols + 4096), bool)
  for r in range(kmap.num_rows):
    for e in range(kmap.counts[head, r]):
      col, mid = int(kmap.index[head, r, e]), int(kmap.mask_id[head, r, e])
      if kmap.transposed:
        g, col = divmod(col, num_q_tiles)
        if g != group_head:
          continue
      tile = np.ones((rows, cols), bool) if mid < 0 else kmap.partial_masks[mid] != 0
      dense[r * rows:(r + 1) * rows, col * cols:(col + 1) * cols] = tile
  if kmap.transposed:
    return dense[:kv_len].T[:q_len]
  return dense[:q_len, :kv_len]


@pytest.mark.parametrize("chip", ["tpu_v5e", "h100"])
def test_block_map_reproduces_mask(chip):
  config = SMALL_TPU if chip == "tpu_v5e" else SMALL_GPU
  t, s, h, kh = 75, 130, 4, 2
  blocks = np.random.default_rng(2).random((h, 10, 9)) < 0.3
  for mask in (CausalMask() & LocalMask(40, 0) | PrefixLMMask(3), BlockMask(blocks, (8, 16)),
               BlockMask(blocks[:kh], (8, 16))):
    bm = build_block_map(mask, q_len=t, kv_len=s, num_q_heads=h, num_kv_heads=kh, head_dim=64,
                         config=config, interpret=True)
    assert bm.build_seconds > 0 and bm is build_block_map(
        mask, q_len=t, kv_len=s, num_q_heads=h, num_kv_heads=kh, head_dim=64, config=config,
        interpret=True)  # Cached.
    want = mask.dense(t, s, num_heads=mask.num_heads)
    mask_head = lambda qh: 0 if mask.num_heads == 1 else (qh if mask.num_heads == h else qh // 2)
    for qh in range(h):
      for kmap in (bm.fwd, bm.dq):
        got = _rebuild(kmap, q_len=t, kv_len=s, head=qh // kmap.head_div)
        np.testing.assert_array_equal(got, want[mask_head(qh)], err_msg=f"{mask} {qh}")
      kmap = bm.dkv
      got = _rebuild(kmap, q_len=t, kv_len=s, head=(qh // 2) // kmap.head_div,
                     num_q_tiles=bm.padded_q_len // kmap.block_cols, group_head=qh % 2)
      np.testing.assert_array_equal(got, want[mask_head(qh)], err_msg=f"dkv {mask} {qh}")
    assert bm.visible_pairs == int(np.sum(want)) * (h // want.shape[0])


def test_block_map_dedups_and_skips():
  bm = build_block_map(CausalMask(), q_len=256, kv_len=256, num_q_heads=2, head_dim=64,
                       config=SMALL_TPU, interpret=True)
  assert bm.fwd.partial_masks.shape[0] == 1  # Every diagonal tile is the same.
  assert list(bm.fwd.counts[0]) == list(range(1, 17))  # Tiles above the diagonal: absent.
  assert bm.fwd.index.shape[0] == 1
  np.testing.assert_array_equal(bm.fwd.mask_id[0, 3, :4], [-1, -1, -1, 0])


def test_block_map_errors():
  kw = dict(q_len=64, kv_len=64, num_q_heads=4, head_dim=64, config=SMALL_TPU)
  with pytest.raises(ValueError, match="mask has 3 heads"):
    build_block_map(BlockMask(np.ones((3, 4, 4), bool), 16), **kw)
  with pytest.raises(ValueError, match="mask="):
    build_block_map("causal", **kw)
  with pytest.raises(ValueError, match="q_len"):
    build_block_map(CausalMask(), **{**kw, "q_len": 0})
  bm = build_block_map(CausalMask(), **kw, interpret=True)
  q = jnp.zeros((1, 65, 4, 64))
  with pytest.raises(ValueError, match="q_len: map 64 vs call 65"):
    block_sparse_attention(q, q, q, bm, interpret=True, config=SMALL_TPU)
  with pytest.raises(ValueError, match="Mask"):
    block_sparse_attention(q, q, q, "causal", interpret=True, config=SMALL_TPU)


# ---------------------------------------------------------------------------- kernels

@dataclasses.dataclass(frozen=True)
class Case:
  """One problem; segments=n packs n documents per row."""
  mask: object
  b: int = 1
  t: int = 45
  s: int = 45
  h: int = 4
  kh: int = 2
  d: int = 32
  dtype: type = jnp.float32
  segments: int = 0

  def inputs(self, seed: int):
    return random_attention_inputs(seed, b=self.b, t=self.t, s=self.s, h=self.h, kh=self.kh,
                                   d=self.d, dtype=self.dtype, segments=self.segments)


def _value_and_grads(fn, args, do, mask, **kw):
  """(out, dq, dk, dv) of fn(q, k, v, mask, **kw)."""
  return value_and_grads(lambda q, k, v: fn(q, k, v, mask, **kw), args, do)


def check(case: Case, config=SMALL_TPU, interpret=True, seed=0):
  args, do, kw = case.inputs(seed)
  got = _value_and_grads(block_sparse_attention, args, do, case.mask, interpret=interpret,
                         config=config, **kw)
  f32 = lambda x: x.astype(jnp.float32)
  want = _value_and_grads(block_sparse_attention_reference, tuple(map(f32, args)), f32(do),
                          case.mask, **kw)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.dtype == case.dtype, name
    g = np.asarray(f32(g))
    assert np.all(np.isfinite(g)), f"{name} has non-finite values (unwritten block?)"
    err = np.max(np.abs(g - np.asarray(w))) / max(1.0, float(np.max(np.abs(w))))
    assert err < _TOL[case.dtype], f"{name}: relative error {err:.2e} for {case}"
  return got


def _per_head_blocks(seed, heads, t, s, block, density):
  return random_block_mask(seed, q_len=t, kv_len=s, block_size=block, density=density,
                           num_heads=heads)


TPU_CASES = {
    "causal_local_gqa_segments": Case(CausalMask() & LocalMask(20, 0), segments=3),
    "local_q_shorter": Case(LocalMask(9, 4), t=29, s=53),
    "chunked_or_prefix_mqa_bf16": Case(ChunkedCausalMask(12) | PrefixLMMask(10), kh=1,
                                       dtype=jnp.bfloat16),
    "full_mha_q_longer": Case(FullMask(), t=53, s=29, kh=4),
    "blocks_per_q_head": Case(_per_head_blocks(3, 4, 45, 45, 8, 0.25)),
    "blocks_per_kv_head_segments": Case(_per_head_blocks(4, 2, 40, 40, 16, 0.5), t=40, s=40,
                                        segments=2),
}
# The same features one at a time (slow sweep).
TPU_SWEEP = {
    "causal": Case(CausalMask()),
    "chunked": Case(ChunkedCausalMask(12), kh=1),
    "prefix_segments": Case(PrefixLMMask(10), t=48, s=48, segments=3),
    "and_or_bf16": Case(CausalMask() & LocalMask(20, 0) | PrefixLMMask(6), dtype=jnp.bfloat16),
    "head_dim_128": Case(CausalMask() | LocalMask(4, 4), d=128, h=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TPU_SWEEP))
def test_tpu_kernel_interpret_sweep(name):
  check(TPU_SWEEP[name], seed=sum(map(ord, name)))


@pytest.mark.parametrize("name", sorted(TPU_CASES))
def test_tpu_kernel_interpret(name):
  check(TPU_CASES[name], seed=sum(map(ord, name)))


def test_rows_that_see_no_key_are_zero_with_finite_grads():
  """Rows 0..15 see nothing (block pattern); rows of segment 7 meet no key of theirs."""
  t = 48
  blocks = np.ones((1, 3, 3), bool)
  blocks[0, 0] = False
  case = Case(BlockMask(blocks, 16), t=t, s=t, h=2, kh=1)
  args, do, _ = case.inputs(1)
  q_ids = jnp.where(jnp.arange(t) < 40, 0, 7)[None].astype(jnp.int32)
  kw = dict(q_segment_ids=q_ids, kv_segment_ids=jnp.zeros((1, t), jnp.int32))
  for config in (SMALL_TPU,):
    out, *grads = _value_and_grads(block_sparse_attention, args, do, case.mask,
                                   interpret=True, config=config, **kw)
    empty = (np.arange(t) < 16) | (np.arange(t) >= 40)
    assert np.all(np.asarray(out)[0, empty] == 0.0)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    want = _value_and_grads(block_sparse_attention_reference, args, do, case.mask, **kw)
    for g, w in zip((out, *grads), want):
      np.testing.assert_allclose(g, w, atol=5e-5)


@pytest.mark.slow
def test_strict_tpu_interpreter():
  """NaN-filled memory, out-of-bounds reads raise, races detected, shuffled grid."""
  import jax.experimental.pallas.tpu as pltpu  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter  # pylint: disable=g-import-not-at-top
  params = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise",
                                 detect_races=True, random_seed=3, num_cores_or_threads=2)
  check(Case(ChunkedCausalMask(16) | LocalMask(3, 3), t=29, s=29, h=2, kh=1, d=16,
             segments=2), interpret=params)
  assert not tpu_interpreter.races.races_found


def test_gpu_kernel_interpret():
  """Mosaic GPU kernels (fwd, dq, dk/dv) interpreted: PARTIAL, FULL and absent tiles,
  GQA, segments, padded lengths and head_dim."""
  blocks = np.array([[[1, 0, 1], [0, 1, 1]], [[1, 1, 0], [1, 0, 0]]], bool)
  mask = BlockMask(blocks, (64, 64)) & LocalMask(100, 10)
  check(Case(mask, t=100, s=150, h=2, kh=1, dtype=jnp.bfloat16, segments=2), config=SMALL_GPU)


@pytest.mark.slow
@pytest.mark.parametrize("wgs", [1, 2])
@pytest.mark.parametrize("name", ["causal", "chunked", "prefix_segments", "and_or_bf16"])
def test_gpu_kernel_interpret_sweep(name, wgs):
  case = dataclasses.replace(TPU_SWEEP[name], dtype=jnp.bfloat16, t=150, s=150)
  check(case, config=dataclasses.replace(SMALL_GPU, compute_wgs_bwd=wgs))


@pytest.mark.slow
@pytest.mark.parametrize("density", [1.0, 0.25, 0.06])
def test_gpu_random_block_mask_sweep(density):
  """Per-head patterns at tiles smaller than the GPU's (PARTIAL everywhere) and aligned."""
  for block in (32, 128):
    mask = _per_head_blocks(6, 4, 200, 260, block, density)
    check(Case(mask, t=200, s=260, h=4, kh=2, d=64, dtype=jnp.bfloat16),
          config=dataclasses.replace(SMALL_GPU, compute_wgs_bwd=2))


DENSITIES = (1.0, 0.5, 0.25, 0.125, 0.06)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("density", DENSITIES)
def test_random_block_mask_sweep(density, seed):
  rng = np.random.default_rng(seed)
  kh = int(rng.choice([1, 2]))
  h = kh * int(rng.choice([1, 2, 4]))
  t, s = (int(x) for x in rng.integers(20, 150, 2))
  heads = int(rng.choice([1, h, kh]))
  block = int(rng.choice([8, 16, 24]))
  mask = _per_head_blocks(seed, heads, t, s, block, density)
  if seed == 2:
    mask = mask & CausalMask()
  check(Case(mask, t=t, s=s, h=h, kh=kh, d=int(rng.choice([8, 64])),
             segments=int(rng.choice([0, 2])) if t == s else 0), seed=seed)


def test_causality_property():
  """Changing token j changes no output before j (CausalMask & LocalMask)."""
  mask = CausalMask() & LocalMask(20, 0)
  q, k, v = Case(mask, t=48, s=48, h=2, kh=1).inputs(4)[0]
  fn = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, mask, interpret=True,
                                                      config=SMALL_TPU))
  base = fn(q, k, v)
  j = 30
  bumped = fn(q.at[:, j].add(1.0), k.at[:, j].add(1.0), v.at[:, j].add(1.0))
  np.testing.assert_array_equal(base[:, :j], bumped[:, :j])
  assert not np.allclose(base[:, j:], bumped[:, j:])


def test_prebuilt_map_equals_mask_call_and_reference_matches_jax_nn():
  case = Case(CausalMask(), t=40, s=40, h=4, kh=2)
  (q, k, v), _, _ = case.inputs(5)
  bm = build_block_map(CausalMask(), q_len=40, kv_len=40, num_q_heads=4, num_kv_heads=2,
                       head_dim=32, config=SMALL_TPU, interpret=True)
  assert isinstance(bm, BlockMap)
  run = lambda m: jax.jit(lambda q, k, v: block_sparse_attention(
      q, k, v, m, interpret=True, config=SMALL_TPU)).lower(q, k, v).compile(FAST_COMPILE)(
          q, k, v)
  got = run(bm)
  np.testing.assert_array_equal(got, run(CausalMask()))
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_allclose(block_sparse_attention_reference(q, k, v, bm), want, atol=2e-5)
  np.testing.assert_allclose(got, want, atol=5e-5)


def _hardware_config(platform: str):
  """The default tuned config of the local chip, or skip when it is not a `platform` chip."""
  chip = config_lib.chip_of_device(jax.devices()[0])
  if chip is None or config_lib.default_config(chip).platform != platform:
    pytest.skip(f"needs a {platform.upper()} kernel target; have {jax.devices()[0].device_kind}")
  return config_lib.default_config(chip)


HARDWARE_CASES = {
    "causal_window_segments": Case(CausalMask() & LocalMask(700, 0), t=1500, s=1500, h=8,
                                   kh=2, d=128, segments=3),
    "random_blocks_25": Case(_per_head_blocks(7, 8, 2000, 2100, 128, 0.25), t=2000, s=2100,
                             h=8, kh=4, d=128),
    "chunked_or_prefix_mqa_hd64": Case(ChunkedCausalMask(256) | PrefixLMMask(300), t=1100,
                                       s=1100, h=4, kh=1, d=64),
}


@pytest.mark.parametrize("platform", [pytest.param("gpu", marks=pytest.mark.gpu),
                                      pytest.param("tpu", marks=pytest.mark.tpu)])
@pytest.mark.parametrize("name", sorted(HARDWARE_CASES))
def test_kernels_on_hardware(name, platform):
  """The real Mosaic GPU / TPU kernels (bf16) with the chip's default tuned config."""
  check(dataclasses.replace(HARDWARE_CASES[name], dtype=jnp.bfloat16),
        config=_hardware_config(platform), interpret=False, seed=sum(map(ord, name)))


def test_tpu_map_over_smem_budget_is_a_clear_error(monkeypatch):
  """A block map too large to scalar-prefetch fails at trace time, naming the fix."""
  from pallas_kernels.block_sparse import tpu as block_sparse_tpu  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(block_sparse_tpu, "SMEM_PREFETCH_WORDS", 16)
  (q, k, v), _, _ = Case(CausalMask()).inputs(0)
  with pytest.raises(ValueError, match="TPU SMEM.*config.block_q"):
    block_sparse_attention(q, k, v, CausalMask(), interpret=True, config=SMALL_TPU)
