"""Tests for layers/cpu_einsum.py: projection einsums in the forms XLA:CPU runs fastest."""

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from layers import cpu_einsum

EQUATIONS = [("bte,em->btm", (2, 8, 16), (16, 24)),
             ("bthd,hde->bte", (2, 8, 4, 8), (4, 8, 16)),
             ("bte,ekd->btkd", (2, 8, 16), (16, 2, 8))]


def _operands(x_shape, y_shape, dtype=jnp.bfloat16):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal(x_shape), dtype),
          jnp.asarray(rng.standard_normal(y_shape), dtype))


def _loss(einsum, equation):
  def loss(x, y):
    out = einsum(equation, x, y)
    return jnp.sum(out.astype(jnp.float32) * jnp.arange(out.size, dtype=jnp.float32).reshape(
        out.shape) / out.size)
  return loss


@pytest.mark.parametrize("equation,x_shape,y_shape", EQUATIONS)
def test_values_and_gradients_match_jnp_einsum(equation, x_shape, y_shape):
  x, y = _operands(x_shape, y_shape)
  got = cpu_einsum.einsum(equation, x, y)
  want = jnp.einsum(equation, x, y)
  assert got.dtype == want.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=1e-2, atol=1e-2)
  got_grads = jax.grad(_loss(cpu_einsum.einsum, equation), argnums=(0, 1))(x, y)
  want_grads = jax.grad(_loss(jnp.einsum, equation), argnums=(0, 1))(x, y)
  for g, w in zip(got_grads, want_grads):
    assert g.dtype == w.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=2e-2, atol=2e-2)


def test_every_dot_takes_bfloat16_and_gives_float32_on_cpu():
  """The forward dot and both backward dots are bf16 x bf16 -> f32 (XLA:CPU's native form)."""
  x, y = _operands((2, 8, 16), (16, 24))
  jaxpr = jax.make_jaxpr(jax.grad(_loss(cpu_einsum.einsum, "bte,em->btm"),
                                  argnums=(0, 1)))(x, y)
  dots = []

  def collect(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        dots.append(eqn)
      for sub in jex.core.jaxprs_in_params(eqn.params):
        collect(sub)
  collect(jaxpr.jaxpr)
  assert len(dots) == 3
  for eqn in dots:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16]
    assert eqn.outvars[0].aval.dtype == jnp.float32


def test_float32_values_and_gradients_match_jnp_einsum():
  x, y = _operands((2, 8, 16), (16, 24), jnp.float32)
  np.testing.assert_allclose(cpu_einsum.einsum("bte,em->btm", x, y),
                             jnp.einsum("bte,em->btm", x, y), rtol=1e-6, atol=1e-6)
  got = jax.grad(_loss(cpu_einsum.einsum, "bte,em->btm"), argnums=(0, 1))(x, y)
  want = jax.grad(_loss(jnp.einsum, "bte,em->btm"), argnums=(0, 1))(x, y)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_other_dtypes_are_plain_einsum():
  x, y = _operands((2, 8, 16), (16, 24), jnp.float16)
  jaxpr = jax.make_jaxpr(lambda x, y: cpu_einsum.einsum("bte,em->btm", x, y))(x, y)
  assert [e.primitive.name for e in jaxpr.eqns] == ["dot_general"]


def test_remat_policies_see_the_dots():
  x, y = _operands((2, 8, 16), (16, 24))
  loss = _loss(cpu_einsum.einsum, "bte,em->btm")
  want = jax.grad(loss, argnums=(0, 1))(x, y)
  for policy in (jax.checkpoint_policies.nothing_saveable, jax.checkpoint_policies.dots_saveable):
    got = jax.grad(jax.checkpoint(loss, policy=policy), argnums=(0, 1))(x, y)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_transposed_equations():
  assert cpu_einsum._transposed_equations("bte,em->btm") == ("btm,em->bte", "bte,btm->em")
  assert cpu_einsum._transposed_equations("ab,bc->c") is None  # 'a' summed in x only
  assert cpu_einsum._transposed_equations("aa,ab->b") is None  # repeated index
  assert cpu_einsum._transposed_equations("...e,em->...m") is None
