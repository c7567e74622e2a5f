"""The WKV-7 Pallas kernels (interpreted on CPU) against the float64 token-by-token oracle.

Each test runs a GPU kernel (h100: Mosaic GPU under jax's Mosaic GPU interpreter,
or Pallas Triton with gpu_kernel='triton') or the TPU one (tpu_v5e: Mosaic TPU)
in interpret mode. Forward: y and the final state, with packed documents,
an initial state, odd lengths (padding), several heads, float32 and bfloat16.
Gradients: all six inputs and the initial state against jax.vjp of the
sequential jnp scan. The default set keeps shapes tiny; the sweep is slow.
"""

import itertools

import jax
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.kernels import FAST_COMPILE, hardware_chip
from helpers.wkv7_reference import wkv7_reference
from layers.ssm import document_index
from pallas_kernels.wkv7 import Wkv7Config, gpu_mosaic, unsupported_reason, wkv7, wkv7_pallas

jax.config.update("jax_default_matmul_precision", "highest")


def inputs(seed, *, b=2, t=21, h=2, d=32):
  """RWKV-7-like inputs (w in (0.54, 1), a = −k̂, b = k̂·iclr), packed documents, a state."""
  rng = np.random.default_rng(seed)
  r, k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(3))
  w = np.exp(-np.exp(-0.5) / (1 + np.exp(-rng.normal(size=(b, t, h, d))))).astype(np.float32)
  kk = rng.normal(size=(b, t, h, d))
  kk = (kk / np.linalg.norm(kk, axis=-1, keepdims=True)).astype(np.float32)
  iclr = rng.uniform(size=(b, t, h, d)).astype(np.float32)
  cuts = np.sort(rng.integers(1, t, size=(b, 2)), axis=1)
  seg = (np.arange(t)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32) + 1
  init = rng.normal(size=(b, h, d, d)).astype(np.float32)
  return (r, w, k, v, -kk, kk * iclr), seg, init


# (chip, gpu_kernel) pairs: both GPU kernels and the TPU one.
KERNELS = [("h100", "mosaic"), ("h100", "triton"), ("tpu_v5e", "mosaic")]
KERNEL_IDS = ["h100-mosaic", "h100-triton", "tpu_v5e"]


def run(chip, chunk, args, seg, init, dtype=jnp.float32, interpret=True, gpu_kernel="mosaic"):
  """(y, state) of the kernel (interpreted unless `interpret` is False); token 0
  continues `init` (doc 0 there)."""
  doc = document_index(jnp.asarray(seg), seg.shape, jnp.asarray(seg[:, 0]))
  config = Wkv7Config(chip, chunk, gpu_kernel)
  fn = lambda *xs: wkv7_pallas(*xs[:6], doc=doc, initial_state=xs[6],  # noqa: E731
                               config=config, interpret=interpret)
  cast = [jnp.asarray(x, dtype) for x in args] + [jnp.asarray(init)]
  return jax.jit(fn).lower(*cast).compile(FAST_COMPILE)(*cast), doc


def check_forward(chip, chunk, *, dtype=jnp.float32, tol=2e-4, interpret=True,
                  gpu_kernel="mosaic", **shape):
  args, seg, init = inputs(chunk + shape.get("t", 21), **shape)
  if dtype == jnp.bfloat16:  # the oracle reads the rounded inputs
    args = tuple(np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in args)
  (y, state), _ = run(chip, chunk, args, seg, init, dtype, interpret, gpu_kernel)
  y_ref, state_ref = wkv7_reference(*args, segment_ids=seg, initial_state=init)
  assert y.dtype == dtype and state.dtype == jnp.float32
  scale = np.abs(y_ref).max()
  np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=tol * scale, rtol=tol)
  np.testing.assert_allclose(state, state_ref, atol=tol * np.abs(state_ref).max(), rtol=tol)


@pytest.mark.parametrize("chip, gpu_kernel", KERNELS, ids=KERNEL_IDS)
def test_forward_segments_state_odd_length(chip, gpu_kernel):
  check_forward(chip, 16, t=21, h=2, d=32, gpu_kernel=gpu_kernel)


def test_forward_bf16_head64_several_heads():
  check_forward("tpu_v5e", 16, dtype=jnp.bfloat16, tol=1e-2, t=19, h=3, d=64, b=1)


def test_mosaic_gpu_forward_bf16_head64_chunk32():
  """The Mosaic GPU kernel at the published head size, 32-token chunks (one tile
  half full), bfloat16 inputs: d = 64 fills the tile's channels, no padding."""
  check_forward("h100", 32, dtype=jnp.bfloat16, tol=1e-2, t=9, h=1, d=64, b=1)


@pytest.mark.parametrize("chip, gpu_kernel", KERNELS, ids=KERNEL_IDS)
def test_gradients_of_all_inputs_and_state(chip, gpu_kernel):
  check_gradients(chip, 16, gpu_kernel=gpu_kernel)


def check_gradients(chip, chunk, interpret=True, tol=2e-4, gpu_kernel="mosaic", **shape):
  """Gradients of all six inputs and the initial state vs jax.vjp of the jnp scan."""
  shape = dict(dict(b=1, t=19, h=2, d=32), **shape)
  args, seg, init = inputs(5, **shape)
  doc = document_index(jnp.asarray(seg), seg.shape, jnp.asarray(seg[:, 0]))
  rng = np.random.default_rng(6)
  dy = rng.normal(size=args[0].shape).astype(np.float32)
  dstate = rng.normal(size=init.shape).astype(np.float32)
  config = Wkv7Config(chip, chunk, gpu_kernel)

  def grads(fn):
    def both(*xs):
      out, vjp = jax.vjp(lambda *ys: fn(*ys[:6], doc=doc, initial_state=ys[6]), *xs)
      return out, vjp((jnp.asarray(dy), jnp.asarray(dstate)))
    xs = [jnp.asarray(x) for x in (*args, init)]
    return jax.jit(both).lower(*xs).compile(FAST_COMPILE)(*xs)

  (y, state), got = grads(lambda *xs, **kw: wkv7_pallas(*xs, **kw, config=config,
                                                        interpret=interpret))
  (y_ref, state_ref), want = grads(wkv7)
  np.testing.assert_allclose(y, y_ref, atol=tol * np.abs(y_ref).max(), rtol=tol)
  np.testing.assert_allclose(state, state_ref, atol=tol * np.abs(state_ref).max(), rtol=tol)
  for name, g, g_ref in zip(("r", "w", "k", "v", "a", "b", "initial_state"), got, want):
    assert np.abs(g_ref).max() > 0, name
    np.testing.assert_allclose(g, g_ref, atol=tol * np.abs(g_ref).max(), rtol=tol,
                               err_msg=name)



@pytest.mark.gpu
@pytest.mark.parametrize("gpu_kernel", ["mosaic", "triton"])
@pytest.mark.parametrize("chunk, d", [(16, 32), (16, 64), (32, 64)])
def test_gpu_kernel_on_hardware(chunk, d, gpu_kernel):
  """The compiled GPU kernels on a Hopper GPU: forward (f32, bf16) and gradients.

  Triton: float32 IEEE dots (2e-4). Mosaic: TF32 wgmmas (10-bit mantissa) in the
  forward and the backward's state scan (the decays and the chunk VJP are float32
  XLA), so float32 gets 5e-3 until measured.
  """
  chip = hardware_chip("gpu")
  tol = 5e-3 if gpu_kernel == "mosaic" else 2e-4
  check_forward(chip, chunk, tol=tol, t=301, h=3, d=d, b=2, interpret=False,
                gpu_kernel=gpu_kernel)
  check_forward(chip, chunk, dtype=jnp.bfloat16, tol=1e-2, t=301, h=3, d=d, b=2,
                interpret=False, gpu_kernel=gpu_kernel)
  check_gradients(chip, chunk, interpret=False, tol=tol, t=301, d=d, gpu_kernel=gpu_kernel)


@pytest.mark.tpu
@pytest.mark.parametrize("chunk, d", [(16, 32), (16, 64), (32, 64)])
def test_tpu_kernel_on_hardware(chunk, d):
  """The compiled Mosaic TPU kernels (f32 matmuls may run in bf16 passes: 1e-2 until
  measured): forward and gradients."""
  chip = hardware_chip("tpu")
  check_forward(chip, chunk, tol=1e-2, t=301, h=3, d=d, b=2, interpret=False)
  check_gradients(chip, chunk, interpret=False, tol=1e-2, t=301, d=d)


def test_no_initial_state_no_doc_and_empty():
  args, _, _ = inputs(7, b=1, t=5, h=1, d=32)
  # Triton: an eager (unjitted) call, which the Mosaic GPU interpreter runs slowly.
  y, state = wkv7_pallas(*args, config=Wkv7Config("h100", 16, "triton"), interpret=True)
  y_ref, state_ref = wkv7_reference(*args)
  np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(state, state_ref, atol=1e-4, rtol=1e-4)
  empty = tuple(x[:, :0] for x in args)
  y, state = wkv7_pallas(*empty, config=Wkv7Config("h100", 16))
  assert y.shape == empty[0].shape and not np.any(state)


@pytest.mark.parametrize("change, match", [
    (dict(d=48), "head size d=48"),
    (dict(dtype=jnp.float16), "dtype float16"),
    (dict(w_shape=(1, 4, 1, 32)), "w has shape"),
    (dict(config="h100"), "must be a Wkv7Config"),
])
def test_errors_name_the_argument(change, match):
  d, dtype = change.get("d", 32), change.get("dtype", jnp.float32)
  x = jnp.zeros((1, 5, 1, d), dtype)
  w = jnp.zeros(change.get("w_shape", x.shape), dtype)
  with pytest.raises(ValueError, match=match):
    wkv7_pallas(x, w, x, x, x, x, config=change.get("config", Wkv7Config("h100", 16)))


def test_config_errors():
  with pytest.raises(ValueError, match="config.chip"):
    Wkv7Config("a100")
  with pytest.raises(ValueError, match="config.chunk_size=24"):
    Wkv7Config("h100", 24)
  with pytest.raises(ValueError, match="config.gpu_kernel='cuda'"):
    Wkv7Config("h100", 16, "cuda")
  assert Wkv7Config("h200").gpu_kernel == "mosaic"
  assert "gpu_kernel='mosaic'" in gpu_mosaic.unsupported_reason(128, 16)
  assert unsupported_reason(64, jnp.bfloat16, 32, "mosaic") is None


@pytest.mark.parametrize("chunk, d, t", [
    (16, 32, 40), pytest.param(16, 64, 301, marks=pytest.mark.slow),
    pytest.param(32, 32, 301, marks=pytest.mark.slow)])
def test_mosaic_gpu_with_tf32_rounding_stays_within_1e3(monkeypatch, chunk, d, t):
  """The Mosaic GPU kernels' wgmmas read TF32 on hardware: with the interpreter
  truncating every matmul operand to TF32, y, the final state and the gradients
  stay within 1e-3 (relative to the largest value) of the oracle; the hardware
  test allows 5e-3."""
  monkeypatch.setattr(gpu_mosaic.TileOps, "emulate_tf32", True)
  check_gradients("h100", chunk, tol=1e-3, t=t, d=d, h=1)


@pytest.mark.slow
@pytest.mark.parametrize("gpu_kernel", ["mosaic", "triton"])
def test_gpu_gradients_chunk32_head64(gpu_kernel):
  check_gradients("h100", 32, t=45, d=64, gpu_kernel=gpu_kernel)


@pytest.mark.slow
@pytest.mark.parametrize("chunk, d, dtype", list(itertools.product(
    [16, 32, 64], [32, 64], [jnp.float32, jnp.bfloat16])))
@pytest.mark.parametrize("chip, gpu_kernel", KERNELS, ids=KERNEL_IDS)
def test_forward_sweep(chip, gpu_kernel, chunk, d, dtype):
  tol = 1e-2 if dtype == jnp.bfloat16 else 2e-4
  check_forward(chip, chunk, dtype=dtype, tol=tol, t=2 * chunk + 7, h=3, d=d,
                gpu_kernel=gpu_kernel)


@pytest.mark.slow
@pytest.mark.parametrize("chip", ["h100", "tpu_v5e"])
def test_long_rows_fastest_decay_chunk64(chip):
  """The strongest decay RWKV-7 allows on every token, chunks of 64: the factored in-chunk
  decays (chunk.py) stay finite and the kernel stays at the oracle's values."""
  args, seg, init = inputs(11, b=1, t=200, h=1, d=32)
  args = (args[0], np.full_like(args[1], np.exp(-np.exp(-0.5))), *args[2:])
  (y, state), _ = run(chip, 64, args, seg, init)
  y_ref, state_ref = wkv7_reference(*args, segment_ids=seg, initial_state=init)
  np.testing.assert_allclose(y, y_ref, atol=2e-4 * np.abs(y_ref).max(), rtol=2e-4)
  np.testing.assert_allclose(state, state_ref, atol=2e-4 * np.abs(state_ref).max(), rtol=2e-4)


@pytest.mark.slow
def test_tpu_strict_interpreter_forward_and_backward():
  """pltpu's interpreter with NaN-filled uninitialized memory, out-of-bounds reads raising
  and race detection: the forward and backward kernels read only what they wrote."""
  args, seg, init = inputs(12, b=1, t=37, h=2, d=32)
  params = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise",
                                 detect_races=True)
  fn = lambda *xs: wkv7_pallas(*xs[:6], initial_state=xs[6],  # noqa: E731
                               config=Wkv7Config("tpu_v5e", 16), interpret=params)
  (y, state), vjp = jax.vjp(fn, *args, init)
  grads = vjp((jnp.ones_like(y), jnp.ones_like(state)))
  y_ref, state_ref = wkv7(*args, initial_state=init)
  np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(state, state_ref, atol=1e-4, rtol=1e-4)
  assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_mosaic_gpu_interpreter_races_forward_and_backward():
  """jax's Mosaic GPU interpreter with race detection (NaN-filled SMEM, out-of-bounds
  reads raising: its defaults): the TMA copies, barrier waits and SMEM reuse of the
  forward kernel and the backward's state scan order every access."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.mosaic_gpu.interpret import (  # pylint: disable=g-import-not-at-top
      interpret_pallas_call as gpu_interpreter)
  from pallas_kernels.common.gpu import interpret_params  # pylint: disable=g-import-not-at-top
  args, seg, init = inputs(13, b=1, t=20, h=1, d=32)
  params = dataclasses.replace(interpret_params(), detect_races=True)
  fn = lambda *xs: wkv7_pallas(*xs[:6], initial_state=xs[6],  # noqa: E731
                               config=Wkv7Config("h100", 16), interpret=params)
  (y, state), vjp = jax.vjp(fn, *args, init)
  grads = vjp((jnp.ones_like(y), jnp.ones_like(state)))
  assert not gpu_interpreter.get_races().races_found
  y_ref, state_ref = wkv7(*args, initial_state=init)
  np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(state, state_ref, atol=1e-4, rtol=1e-4)
  assert all(np.isfinite(g).all() for g in grads)
