"""SSD kernel numerics in interpret mode against the chunked jnp form and the token oracle.

The TPU kernel runs under Pallas' HLO interpreter (and once under the strict
TPU interpreter: NaN memory, out-of-bounds reads raise, races detected); the
GPU Triton kernel under the same HLO interpreter; the Mosaic GPU forward
(gpu_kernel='mosaic', followed by the Triton backward) under jax's Mosaic GPU
interpreter (warpgroups, SMEM, TMA and barriers simulated; its wgmmas run as
jnp dots there, so TF32 shows only on hardware). Each case checks y, the
final state and the gradients of x, dt, a, B, C, D and the initial state
(the Pallas forward and reverse-scan backward kernels) against the jnp form's
on odd lengths, several groups, packed documents and an initial state.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.ssm.ssd import resolve_impl
from pallas_kernels.ssd import SsdConfig, ssd, ssd_reference

from helpers.kernels import FAST_COMPILE, hardware_chip
from helpers.ssd_reference import ssd_sequential

# Max |kernel - reference| / max(1, max |reference|), per dtype.
_TOL = {jnp.float32: 5e-5, jnp.bfloat16: 3e-2}
TPU = SsdConfig("tpu_v5e")
GPU = SsdConfig("h100", gpu_kernel="triton", gpu_block=16)  # Several loop steps at test lengths.
MOSAIC = SsdConfig("h100")  # gpu_kernel='mosaic': blocks of 64 tokens.
_GRAD_NAMES = ("dx", "ddt", "da", "dB", "dC", "dD", "dstate0")


@dataclasses.dataclass(frozen=True)
class Case:
  """One SSD problem; documents=n packs n documents per row (ids change between them)."""
  b: int = 2
  t: int = 45
  h: int = 4
  ng: int = 2
  d: int = 32
  n: int = 32
  chunk: int = 16
  dtype: type = jnp.float32
  documents: int = 0
  initial_state: bool = False
  initial_segments: bool = False  # Row 0 continues the initial state's document, row 1 not.

  def inputs(self, seed: int):
    """(x, dt, a, B, C, D, state0), the cotangents (dy, dstate), the keyword arguments."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    cast = lambda z: jnp.asarray(z, self.dtype)  # noqa: E731
    b, t, h = self.b, self.t, self.h
    args = (cast(normal(b, t, h, self.d)),
            jnp.asarray(rng.uniform(0.01, 0.3, (b, t, h)), jnp.float32),
            -jnp.asarray(rng.uniform(0.5, 3.0, h), jnp.float32),
            cast(normal(b, t, self.ng, self.n) / 3), cast(normal(b, t, self.ng, self.n) / 3),
            jnp.asarray(normal(h)),
            jnp.asarray(normal(b, h, self.d, self.n)) if self.initial_state else None)
    cotangents = (jnp.asarray(normal(b, t, h, self.d)), jnp.asarray(normal(b, h, self.d, self.n)))
    kw = {}
    if self.documents:
      cuts = np.sort(rng.choice(np.arange(1, t), (b, self.documents - 1), replace=False), axis=1)
      ids = (np.arange(t)[None, :, None] >= cuts[:, None, :]).sum(-1) + 1
      kw["segment_ids"] = jnp.asarray(ids, jnp.int32)
    if self.initial_segments:
      kw["initial_segment_ids"] = jnp.asarray([1, 0], jnp.int32)[:b]
    return args, cotangents, kw


def value_and_grads(fn, args, cotangents):
  """(y, final state, *grads of args), compiled once; no grad for a None initial state."""
  args = tuple(a for a in args if a is not None)

  def both(*args):
    out, vjp = jax.vjp(fn, *args)
    return (*out, *vjp(tuple(c.astype(o.dtype) for c, o in zip(cotangents, out))))
  return jax.jit(both).lower(*args).compile(FAST_COMPILE)(*args)


def check(case: Case, config: SsdConfig, interpret=True, seed=0, grads=True,
          oracle=ssd_reference, tol=None):
  """Kernel vs `oracle` (float32 inputs): y, final state, and the grads when `grads`."""
  args, cotangents, kw = case.inputs(seed)
  has_state = case.initial_state

  def call(impl):
    def fn(x, dt, a, bmat, cmat, d_skip, state0=None):
      return impl(x, dt, a, bmat, cmat, d_skip, chunk_size=case.chunk, initial_state=state0,
                  **kw)
    return fn
  kernel = lambda *a, **k: ssd(*a, interpret=interpret, config=config, **k)  # noqa: E731
  f32 = lambda z: None if z is None else z.astype(jnp.float32)  # noqa: E731
  if grads:
    got = value_and_grads(call(kernel), args, cotangents)
    want = value_and_grads(call(oracle), tuple(map(f32, args)), cotangents)
  else:
    kernel_args = [a for a in args if a is not None]
    got = jax.jit(call(kernel)).lower(*kernel_args).compile(FAST_COMPILE)(*kernel_args)
    want = call(oracle)(*[f32(a) for a in args if a is not None])
  names = ("y", "final_state") + _GRAD_NAMES[:6 + has_state]
  tol = tol or _TOL[case.dtype]
  for name, g, w in zip(names, got, want):
    g = np.asarray(g.astype(jnp.float32))
    assert np.all(np.isfinite(g)), f"{name} has non-finite values (unwritten block?)"
    err = np.max(np.abs(g - np.asarray(w))) / max(1.0, float(np.max(np.abs(w))))
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e} for {case}"
  assert got[0].dtype == case.dtype and got[1].dtype == jnp.float32
  return got


CASES = {
    # GPU: 3 blocks of 16, a state saved every 2 (chunk 32), one recomputed in the backward.
    "documents_and_state": Case(chunk=32, documents=3, initial_state=True,
                                initial_segments=True),
    "one_group_short": Case(b=1, t=7, h=2, ng=1, chunk=64),
}


# The TPU kernel's padding of a short row is covered by the strict interpreter test.
@pytest.mark.parametrize("config, name", [(TPU, "documents_and_state"),
                                          (GPU, "documents_and_state"),
                                          (GPU, "one_group_short")],
                         ids=["tpu-documents_and_state", "gpu-documents_and_state",
                              "gpu-one_group_short"])
def test_kernel_interpret(config, name):
  check(CASES[name], config)


MOSAIC_CASES = {
    # float32: the Mosaic forward (3 blocks of 64, two ring slots, 2 groups), then the
    # Triton backward from a state saved every 2 blocks (chunk 128).
    "documents_and_state": Case(b=2, t=150, h=2, ng=2, chunk=128, documents=3,
                                initial_state=True, initial_segments=True),
    # Mamba-2's published head (d 64, N 128) in bfloat16: Mosaic forward and backward
    # (one ring slot), 2 blocks, the second padded.
    "mamba2_bf16": Case(b=1, t=70, h=2, ng=1, d=64, n=128, chunk=256, dtype=jnp.bfloat16,
                        documents=2, initial_state=True),
}


@pytest.mark.parametrize("name", sorted(MOSAIC_CASES))
def test_mosaic_gpu_kernel_interpret(name):
  """The Mosaic GPU forward and (16-bit) backward, interpreted."""
  check(MOSAIC_CASES[name], MOSAIC)


@pytest.mark.slow
def test_mosaic_gpu_backward_interpret_documents():
  """The Mosaic backward in bfloat16 with two ring slots, 3 blocks, packed documents,
  2 groups, an initial state and initial segment ids."""
  check(dataclasses.replace(MOSAIC_CASES["documents_and_state"], dtype=jnp.bfloat16), MOSAIC)


@pytest.mark.slow
def test_mosaic_gpu_backward_maths_is_exact(monkeypatch):
  """The Mosaic backward's maths at float32 tolerance: interpreted, its wgmmas are float32
  dots, so letting float32 inputs in (on hardware they take the Triton backward) checks
  it beyond bfloat16 rounding."""
  from pallas_kernels.ssd import gpu_mosaic_bwd  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gpu_mosaic_bwd, "slots_for", lambda *_: 2)
  check(MOSAIC_CASES["documents_and_state"], MOSAIC)


@pytest.mark.slow
def test_tpu_short_row():
  check(CASES["one_group_short"], TPU)



# The shipped shapes on hardware: the tiny model's and Mamba-2's published (d 64, N 128,
# chunk 256), with documents, an initial state and a length that is not a chunk multiple.
HARDWARE_CASES = {
    "tiny": CASES["documents_and_state"],
    "mamba2_published": Case(b=2, t=700, h=4, ng=1, d=64, n=128, chunk=256, documents=3,
                             initial_state=True, initial_segments=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_kernel", ["mosaic", "triton"])
@pytest.mark.parametrize("name", sorted(HARDWARE_CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gpu_kernel_on_hardware(name, dtype, gpu_kernel):
  """The compiled GPU kernels on a Hopper GPU, forward and backward, default block sizes.

  The Mosaic forward's float32 wgmmas run as TF32 (about 10 mantissa bits), so
  its float32 tolerance is 1e-2, not the IEEE 5e-5 of the Triton kernels.
  """
  tol = 1e-2 if gpu_kernel == "mosaic" and dtype == jnp.float32 else None
  check(dataclasses.replace(HARDWARE_CASES[name], dtype=dtype),
        SsdConfig(hardware_chip("gpu"), gpu_kernel=gpu_kernel), interpret=False, tol=tol)


@pytest.mark.tpu
@pytest.mark.parametrize("name", sorted(HARDWARE_CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_tpu_kernel_on_hardware(name, dtype):
  """The compiled Mosaic TPU kernels, forward and backward (the MXU may take f32 in bf16
  passes: bf16 tolerance for both until measured)."""
  case = dataclasses.replace(HARDWARE_CASES[name], dtype=dtype)
  check(case, SsdConfig(hardware_chip("tpu")), interpret=False, tol=_TOL[jnp.bfloat16])


@pytest.mark.parametrize("config", [TPU, GPU], ids=["tpu", "gpu"])
def test_bfloat16(config):
  check(Case(b=2, t=21, h=2, dtype=jnp.bfloat16, documents=2, initial_state=True,
             initial_segments=True), config)


def test_forward_matches_the_token_oracle():
  """Against the token-by-token recurrence (not only the chunked form), chunk 8, 4 groups."""
  def oracle(*args, chunk_size, **kw):
    del chunk_size
    return ssd_sequential(*args, **kw)
  check(Case(b=1, t=37, h=4, ng=4, chunk=8, documents=2, initial_state=True), TPU,
        grads=False, oracle=oracle)


def test_strict_tpu_interpreter():
  """NaN-filled memory, OOB reads raise, races detected, parallel axes on 2 cores."""
  import jax.experimental.pallas.tpu as pltpu  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter  # pylint: disable=g-import-not-at-top
  params = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise",
                                 detect_races=True, random_seed=3, num_cores_or_threads=2)
  check(Case(b=1, t=13, h=2, ng=1, chunk=8, documents=2, initial_state=True), TPU,
        interpret=params, grads=False)
  assert not tpu_interpreter.races.races_found


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("config", [TPU, GPU], ids=["tpu", "gpu"])
def test_random_shapes_sweep(seed, config):
  rng = np.random.default_rng(seed)
  ng = int(rng.choice([1, 2]))
  case = Case(b=int(rng.integers(1, 3)), t=int(rng.integers(1, 150)), h=ng * 2, ng=ng,
              d=int(rng.choice([16, 32, 64])), n=int(rng.choice([16, 32, 128])),
              chunk=int(rng.choice([8, 32, 64])), documents=int(rng.integers(0, 4)),
              initial_state=bool(rng.integers(2)))
  if case.documents and case.documents > case.t - 1:
    case = dataclasses.replace(case, documents=0)
  check(case, config, seed=seed)


@pytest.mark.parametrize("kwargs, match", [
    (dict(config=SsdConfig("h100"), d=48), "head_dim=48"),
    (dict(config=SsdConfig("h100"), n=8), "state_size=8"),
    (dict(config=TPU, chunk=12), "chunk_size=12"),
    (dict(config=TPU, dtype=jnp.float16), "float16"),
    (dict(config=MOSAIC, d=256, n=256), "shared memory.*gpu_kernel='triton'"),
])
def test_clear_errors(kwargs, match):
  config = kwargs.pop("config")
  case = Case(b=1, t=8, **kwargs)
  args, _, _ = case.inputs(0)
  with pytest.raises(ValueError, match=match):
    ssd(*args[:6], chunk_size=case.chunk, config=config, interpret=True)


def test_config_checks():
  with pytest.raises(ValueError, match="config.chip"):
    SsdConfig("a100")
  with pytest.raises(ValueError, match="config.gpu_block"):
    SsdConfig("h100", gpu_block=48)
  with pytest.raises(ValueError, match="config.gpu_kernel"):
    SsdConfig("h100", gpu_kernel="cuda")


def test_resolve_impl():
  """'auto' picks the kernel only on a chip serving the shapes; 'pallas' errors name the field."""
  kw = dict(head_dim=64, state_size=128, chunk_size=256, dtype=jnp.bfloat16)
  assert resolve_impl("auto", backend="cpu", chip="", **kw) == "xla"
  assert resolve_impl("auto", backend="tpu", chip="tpu_v6e", **kw) == "pallas"
  assert resolve_impl("auto", backend="cuda", chip="h200", **kw) == "pallas"
  assert resolve_impl("auto", backend="cuda", chip="", **kw) == "xla"  # A100: no kernel.
  assert resolve_impl("auto", backend="cuda", chip="h100", **dict(kw, head_dim=48)) == "xla"
  assert resolve_impl("xla", backend="tpu", chip="tpu_v5e", **kw) == "xla"
  # Too large for the Mosaic GPU kernel's shared memory, not for Triton's.
  big = dict(kw, head_dim=256, state_size=256, dtype=jnp.float32)
  assert resolve_impl("auto", backend="cuda", chip="h100", **big) == "xla"
  assert resolve_impl("auto", backend="cuda", chip="h100", gpu_kernel="triton", **big) == "pallas"
  with pytest.raises(ValueError, match=r"model.ssm_impl='pallas'.*head_dim=48.*'xla'"):
    resolve_impl("pallas", backend="cuda", chip="h100", **dict(kw, head_dim=48))
  with pytest.raises(ValueError, match="model.ssm_impl='fast'"):
    resolve_impl("fast", backend="cpu", chip="", **kw)
