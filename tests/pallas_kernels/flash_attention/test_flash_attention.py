"""Flash attention numerics in interpret mode against the plain-jnp reference.

The TPU kernel runs under Pallas' HLO interpreter (interpret=True: outputs and
scratch start as NaN, so an unwritten block fails) and once under the strict
TPU interpreter (NaN memory, out-of-bounds reads raise, race detection,
shuffled parallel grid on two simulated cores). The Mosaic GPU kernel runs under
jax's GPU interpreter (warpgroups, SMEM, TMA and mbarriers simulated; only the
wgmma instruction is replaced by a jnp matmul, see pallas_kernels/common/gpu.py).
Every case checks the output and the gradients of q, k and v on fresh random
inputs. Small block sizes make short sequences span many tiles.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import config as config_lib
from pallas_kernels.flash_attention import (FlashAttentionConfig, attention_reference,
                                            flash_attention)

from helpers.kernels import hardware_chip, random_attention_inputs, value_and_grads

# Several tiles per sequence at test lengths (interpret mode has no alignment rule).
SMALL_TPU = FlashAttentionConfig("tpu_v5e", block_q=32, block_kv=16, block_q_dq=16,
                                 block_kv_dq=32, block_q_dkv=32, block_kv_dkv=16)
SMALL_GPU = FlashAttentionConfig("h100", block_q=64, block_kv=64, block_q_dq=64,
                                 block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64,
                                 max_concurrent_steps=2, compute_wgs_bwd=2)
# Max |kernel - reference| / max(1, max |reference|), per dtype.
_TOL = {jnp.float32: 5e-5, jnp.bfloat16: 3e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention problem; segments=n packs n documents per row."""
  b: int = 2
  t: int = 37
  s: int = 45
  h: int = 4
  kh: int = 2
  d: int = 64
  dtype: type = jnp.float32
  causal: bool = False
  segments: int = 0
  window: object = None

  def inputs(self, seed: int):
    args, do, ids = random_attention_inputs(seed, b=self.b, t=self.t, s=self.s, h=self.h,
                                            kh=self.kh, d=self.d, dtype=self.dtype,
                                            segments=self.segments)
    return args, do, dict(causal=self.causal, local_window_size=self.window, **ids)


def check(case: Case, config=SMALL_TPU, interpret=True, seed=0, tol=None):
  args, do, kw = case.inputs(seed)
  got = value_and_grads(functools.partial(flash_attention, interpret=interpret, config=config,
                                          **kw), args, do)
  f32 = lambda x: x.astype(jnp.float32)
  want = value_and_grads(functools.partial(attention_reference, **kw), tuple(map(f32, args)),
                         f32(do))
  tol = max(tol or 0.0, _TOL[case.dtype])
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.dtype == case.dtype, name
    g = np.asarray(f32(g))
    assert np.all(np.isfinite(g)), f"{name} has non-finite values (unwritten block?)"
    err = np.max(np.abs(g - np.asarray(w))) / max(1.0, float(np.max(np.abs(w))))
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e} for {case}"
  return got


TPU_CASES = {
    "mha": Case(kh=4),
    "gqa2_causal": Case(causal=True),
    "gqa4_q_longer": Case(t=53, s=29, h=8, kh=2),
    "gqa8_causal": Case(b=1, t=40, s=40, h=8, kh=1, causal=True),
    "mqa_window": Case(h=4, kh=1, window=(6, 3)),
    "segments_causal": Case(t=64, s=64, segments=4, causal=True),
    "segments_cross": Case(t=33, s=51, segments=3),
    "everything": Case(t=61, s=61, h=8, kh=2, causal=True, segments=3, window=(20, 4)),
    "head_dim_128": Case(b=1, d=128, causal=True),
    "head_dim_256": Case(b=1, t=20, s=24, d=256),
    "bf16_segments_causal": Case(t=64, s=64, dtype=jnp.bfloat16, segments=3, causal=True),
    "bf16_gqa4_window": Case(h=8, kh=2, dtype=jnp.bfloat16, window=(12, 12)),
}


@pytest.mark.parametrize("name", sorted(TPU_CASES))
def test_tpu_kernel_interpret(name):
  check(TPU_CASES[name], seed=sum(map(ord, name)))  # str hash() varies per process.


def test_rows_that_see_no_key_are_zero_with_finite_grads():
  # Query segment 7 never occurs among the keys; window (3, -2) hides the
  # first two queries from every key.
  case = Case(b=1, t=24, s=24, h=2, kh=1)
  args, do, _ = case.inputs(1)
  q_ids = jnp.where(jnp.arange(24) < 20, 0, 7)[None].astype(jnp.int32)
  kv_ids = jnp.zeros((1, 24), jnp.int32)
  for kw in (dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids),
             dict(local_window_size=(3, -2))):
    out, *grads = value_and_grads(functools.partial(flash_attention, interpret=True,
                                                    config=SMALL_TPU, **kw), args, do)
    empty = (np.arange(24) >= 20) if "q_segment_ids" in kw else (np.arange(24) < 2)
    assert np.all(np.asarray(out)[0, empty] == 0.0)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    want = value_and_grads(functools.partial(attention_reference, **kw), args, do)
    np.testing.assert_allclose(out, want[0], atol=5e-5)
    for g, w in zip(grads, want[1:]):
      np.testing.assert_allclose(g, w, atol=5e-5)


def test_default_config_and_layer_call():
  """The attention layer's call: causal + segment ids, config=None, interpret on CPU."""
  case = Case(b=1, t=300, s=300, h=4, kh=2, causal=True, segments=4)
  args, do, kw = case.inputs(2)
  out = jax.jit(lambda q, k, v: flash_attention(
      q, k, v, causal=True, q_segment_ids=kw["q_segment_ids"],
      kv_segment_ids=kw["kv_segment_ids"], interpret=jax.default_backend() == "cpu"))(*args)
  want = attention_reference(*args, **kw)
  np.testing.assert_allclose(out, want, atol=5e-5)


def test_strict_tpu_interpreter():
  """NaN-filled memory, OOB reads raise, race detection, shuffled grid on 2 cores."""
  import jax.experimental.pallas.tpu as pltpu  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter  # pylint: disable=g-import-not-at-top
  params = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise",
                                 detect_races=True, random_seed=3, num_cores_or_threads=2)
  case = Case(b=1, t=45, s=40, h=4, kh=2, causal=True, segments=2, window=(24, 2))
  check(case, interpret=params)
  assert not tpu_interpreter.races.races_found


GPU_CASES = {
    # Every mask feature, GQA, padded lengths and head_dim (32 -> 64).
    "everything": Case(b=1, t=120, s=120, h=2, kh=1, d=32, dtype=jnp.bfloat16, causal=True,
                       segments=3, window=(70, 0)),
    # Causal only: both wholly visible (unmasked path) and diagonal tiles.
    "causal": Case(b=1, t=128, s=128, h=1, kh=1, dtype=jnp.bfloat16, causal=True),
}


@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_gpu_kernel_interpret(name):
  """Mosaic GPU kernels (fwd, dq, dk/dv), interpreted."""
  check(GPU_CASES[name], config=SMALL_GPU)


@pytest.mark.slow
@pytest.mark.parametrize("wgs", [1, 2])
@pytest.mark.parametrize("name", ["mha", "gqa4_q_longer", "mqa_window", "segments_cross",
                                  "head_dim_128"])
def test_gpu_kernel_interpret_sweep(name, wgs):
  case = dataclasses.replace(TPU_CASES[name], dtype=jnp.bfloat16)
  check(case, config=dataclasses.replace(SMALL_GPU, compute_wgs_bwd=wgs))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("causal", [False, True])
def test_tpu_random_shapes_sweep(seed, causal):
  rng = np.random.default_rng(seed)
  kh = int(rng.choice([1, 2]))
  case = Case(b=int(rng.integers(1, 3)), t=int(rng.integers(1, 90)),
              s=int(rng.integers(1, 90)), h=kh * int(rng.choice([1, 2, 4, 8])), kh=kh,
              d=int(rng.choice([8, 64, 128])), causal=causal,
              segments=int(rng.choice([0, 2, 3])) if causal else 0,
              window=[None, (5, 17), (30, 0)][seed % 3])
  if case.segments and case.t != case.s:
    case = dataclasses.replace(case, s=case.t)
  check(case, seed=seed)


def test_causality_property():
  """Changing token j changes no output before j."""
  case = Case(b=1, t=48, s=48, h=2, kh=1, causal=True)
  (q, k, v), _, _ = case.inputs(4)
  fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=True,
                                               config=SMALL_TPU))
  base = fn(q, k, v)
  j = 30
  bumped = fn(q.at[:, j].add(1.0), k.at[:, j].add(1.0), v.at[:, j].add(1.0))
  np.testing.assert_array_equal(base[:, :j], bumped[:, :j])
  assert not np.allclose(base[:, j:], bumped[:, j:])


def test_reference_matches_jax_nn():
  case = Case(b=2, t=40, s=40, h=4, kh=2)
  (q, k, v), _, _ = case.inputs(5)
  for kw in (dict(is_causal=False), dict(is_causal=True),
             dict(local_window_size=(5, 2)), dict(is_causal=True, local_window_size=(7, 7))):
    want = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="xla",
                                     **kw))(q, k, v)
    got = jax.jit(functools.partial(
        attention_reference, causal=kw.get("is_causal", False),
        local_window_size=kw.get("local_window_size")))(q, k, v)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(q=jnp.zeros((2, 8, 4))), "q must be 4-D"),
    (dict(k=jnp.zeros((2, 8, 3, 16)), v=jnp.zeros((2, 8, 3, 16))),
     "num_q_heads=4 must be a multiple"),
    (dict(v=jnp.zeros((2, 9, 2, 16))), "k and v must have one shape"),
    (dict(q_segment_ids=jnp.zeros((2, 8), jnp.int32)), "given together"),
    (dict(q_segment_ids=jnp.zeros((2, 7), jnp.int32),
          kv_segment_ids=jnp.zeros((2, 8), jnp.int32)), "q_segment_ids must be int"),
    (dict(local_window_size=(1, 2, 3)), "local_window_size"),
    (dict(q=jnp.zeros((2, 8, 4, 512)), k=jnp.zeros((2, 8, 2, 512)),
          v=jnp.zeros((2, 8, 2, 512))), "head_dim=512"),
    (dict(q=jnp.zeros((2, 8, 4, 16), jnp.int32)), "share a dtype"),
    (dict(config=FlashAttentionConfig("tpu_v5e", block_q=136)), "multiple of 128"),
    (dict(config=FlashAttentionConfig("h100")), "Mosaic GPU kernel takes bfloat16"),
    (dict(config="h100"), "FlashAttentionConfig"),
])
def test_clear_errors(kwargs, match):
  args = dict(q=jnp.zeros((2, 8, 4, 16)), k=jnp.zeros((2, 8, 2, 16)),
              v=jnp.zeros((2, 8, 2, 16)))
  args.update(kwargs)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  with pytest.raises(ValueError, match=match):
    flash_attention(q, k, v, **args)


def test_config_tables_and_errors():
  for chip in config_lib.CHIPS:
    for head_dim in (8, 64, 100, 128, 256):
      cfg = config_lib.default_config(chip).resolve(head_dim)
      assert all(getattr(cfg, f.name) is not None for f in dataclasses.fields(cfg)
                 if cfg.platform == "gpu" or f.name.startswith("block"))
  assert config_lib.default_config("h100").resolve(64).block_kv == 128
  assert FlashAttentionConfig("h100", block_kv=192).resolve(128).block_kv == 192
  with pytest.raises(ValueError, match="config.chip"):
    FlashAttentionConfig("a100")
  with pytest.raises(ValueError, match="config.block_q"):
    FlashAttentionConfig("h100", block_q=60)
  hash(config_lib.default_config("tpu_v6e"))



@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gqa2_causal", "everything", "segments_cross",
                                  "head_dim_128", "head_dim_256", "mqa_window"])
def test_gpu_kernel_on_hardware(name):
  """The real Mosaic GPU kernel on a Hopper GPU (bf16), default tuned config."""
  chip = hardware_chip("gpu")
  case = dataclasses.replace(TPU_CASES[name], dtype=jnp.bfloat16)
  check(case, config=config_lib.default_config(chip), interpret=False)
  long_case = dataclasses.replace(case, t=1500, s=1700 if not case.segments else 1500)
  check(long_case, config=config_lib.default_config(chip), interpret=False)


@pytest.mark.tpu
@pytest.mark.parametrize("name", sorted(TPU_CASES))
def test_tpu_kernel_on_hardware(name):
  """The real Mosaic TPU kernel on a TPU, default tuned config."""
  chip = hardware_chip("tpu")
  case = TPU_CASES[name]
  tol = 1e-2  # The MXU may run f32 matmuls in bf16 passes; tighten once measured.
  check(case, config=config_lib.default_config(chip), interpret=False, tol=tol)
  long_case = dataclasses.replace(case, t=1500, s=1700 if not case.segments else 1500)
  check(long_case, config=config_lib.default_config(chip), interpret=False, tol=tol)
