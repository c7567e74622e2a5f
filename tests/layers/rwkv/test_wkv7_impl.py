"""The WKV-7 implementation switch: 'auto' resolution, errors naming model.rwkv_impl, dispatch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest

from layers.rwkv.wkv7 import resolve_impl, wkv7, wkv7_apply


@pytest.mark.parametrize("chip, head_size, chunk, expected", [
    ("", 64, 16, "xla"),  # CPU: no kernel target
    ("h100", 64, 16, "pallas"),
    ("tpu_v5e", 32, 64, "pallas"),
    ("h100", 16, 16, "xla"),  # head size the kernel does not serve
    ("h100", 64, 8, "xla"),  # chunk length it does not take
    ("tpu_v5p", 64, 0, "xla"),  # the sequential scan asked for
])
def test_auto(chip, head_size, chunk, expected):
  assert resolve_impl("auto", chip=chip, head_size=head_size, chunk_size=chunk) == expected
  assert resolve_impl("xla", chip=chip, head_size=head_size, chunk_size=chunk) == "xla"


@pytest.mark.parametrize("impl, head_size, chunk, pattern", [
    ("cuda", 64, 16, r"model\.rwkv_impl='cuda'"),
    ("pallas", 48, 16, r"model\.rwkv_impl='pallas'.*head size d=48.*model\.head_size=48.*'xla'"),
    ("pallas", 64, 24, r"model\.rwkv_impl='pallas'.*model\.chunk_size=24"),
    ("pallas", 64, 0, r"model\.rwkv_impl='pallas'.*model\.chunk_size=0"),
])
def test_errors_name_the_field_and_the_fix(impl, head_size, chunk, pattern):
  with pytest.raises(ValueError, match=pattern):
    resolve_impl(impl, chip="h100", head_size=head_size, chunk_size=chunk)


def test_single_token_stays_sequential():
  """Decode steps (t = 1) take the sequential scan whatever the implementation: here a
  head size the kernel cannot serve still runs."""
  rng = np.random.default_rng(0)
  r, k, v, a, b = (jnp.asarray(rng.normal(size=(2, 1, 1, 8)), jnp.float32) for _ in range(5))
  w = jnp.full(r.shape, 0.9, jnp.float32)
  state = jnp.asarray(rng.normal(size=(2, 1, 8, 8)), jnp.float32)
  y, new = wkv7_apply(r, w, k, v, a, b, impl="pallas", chip="h100", chunk_size=16,
                      initial_state=state)
  y_ref, new_ref = wkv7(r, w, k, v, a, b, initial_state=state)
  np.testing.assert_allclose(y, y_ref)
  np.testing.assert_allclose(new, new_ref)
  with pytest.raises(ValueError, match="Unresolved"):
    wkv7_apply(r, w, k, v, a, b, impl="auto", chunk_size=16)


def test_pallas_runs_per_shard_under_a_mesh():
  """Under a mesh the kernel runs per (batch, heads) shard and equals the scan."""
  rng = np.random.default_rng(1)
  r, k, v, a, b = (jnp.asarray(rng.normal(size=(2, 5, 2, 32)) / 4, jnp.float32)
                   for _ in range(5))
  w = jnp.asarray(rng.uniform(0.6, 1.0, size=r.shape), jnp.float32)
  doc = jnp.asarray([[0, 0, 1, 1, 1], [0, 0, 0, 0, 2]], jnp.int32)
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
  rules = (("batch", "data"), ("heads", "model"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    y, state = jax.jit(lambda *xs: wkv7_apply(*xs, impl="pallas", chunk_size=16, doc=doc))(
        r, w, k, v, a, b)
  y_ref, state_ref = wkv7(r, w, k, v, a, b, doc=doc)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(state, state_ref, atol=1e-5, rtol=1e-4)
