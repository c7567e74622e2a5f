"""The WKV-7 implementation switch: 'auto' resolution, errors naming model.rwkv_impl, dispatch."""

import jax.numpy as jnp
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
