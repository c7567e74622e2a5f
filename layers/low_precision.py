"""Einsums of bfloat16 operands in the form XLA:CPU runs natively.

XLA:CPU has no dot with a bfloat16 result. It converts both bfloat16 operands
to float32, multiplies in float32 and rounds the product back: two extra
passes over the operands and one over the result, and a float32 matmul. A
dot of bfloat16 operands with a float32 result (`preferred_element_type`) runs
natively (YNNPACK; avx512_bf16 where the CPU has it), more than twice as fast
on the tiny Llama's shapes. `einsum` asks for that form in the forward pass and
in both dots of the backward pass, and rounds each result to the operand dtype
itself.

The values are those of `jnp.einsum`: a bfloat16 einsum accumulates in float32
and rounds once on every backend, and so does this (up to summation order).
Only the form of the HLO differs. Elsewhere than on CPU, in float32, or for an
equation whose transposes are not plain einsums, `einsum` is `jnp.einsum`:
GPUs and TPUs already run bfloat16 dots natively.

Shapes: any einsum of two operands, e.g. 'bte,em->btm'.
"""

import functools

import jax
import jax.numpy as jnp

_NATIVE_WITH_F32_RESULT = (jnp.dtype(jnp.bfloat16),)


def _transposed_equations(equation: str) -> tuple[str, str] | None:
  """'x,y->z' -> ('z,y->x', 'x,z->y'), the einsums of the two input cotangents.

  None when they are not einsums: an index summed within one operand only, a
  repeated index, or an ellipsis.
  """
  if "..." in equation or "->" not in equation:
    return None
  inputs, out = equation.replace(" ", "").split("->")
  if inputs.count(",") != 1:
    return None
  x, y = inputs.split(",")
  for name in (x, y, out):
    if len(set(name)) != len(name):
      return None
  if set(x) - set(y) - set(out) or set(y) - set(x) - set(out) or set(out) - set(x) - set(y):
    return None
  return f"{out},{y}->{x}", f"{x},{out}->{y}"


def _dot(equation: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _f32_accumulated_einsum(equation: str, x: jax.Array, y: jax.Array) -> jax.Array:
  return _dot(equation, x, y, x.dtype)


def _forward(equation, x, y):
  return _dot(equation, x, y, x.dtype), (x, y)


def _backward(equation, residuals, g):
  x, y = residuals
  eq_x, eq_y = _transposed_equations(equation)
  g = g.astype(x.dtype)
  return _dot(eq_x, g, y, x.dtype), _dot(eq_y, x, g, y.dtype)


_f32_accumulated_einsum.defvjp(_forward, _backward)


def einsum(equation: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """`jnp.einsum(equation, x, y)` for operands of one dtype; natively on XLA:CPU in bf16."""
  native = (jax.default_backend() == "cpu" and x.dtype == y.dtype
            and x.dtype in _NATIVE_WITH_F32_RESULT and _transposed_equations(equation))
  if not native:
    return jnp.einsum(equation, x, y)
  return _f32_accumulated_einsum(equation, x, y)
