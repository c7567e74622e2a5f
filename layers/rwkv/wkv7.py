"""The WKV-7 recurrence and its implementation switch ('xla' | 'pallas' | 'auto').

The plain-jnp forms live beside the Pallas kernel that computes the same thing
(pallas_kernels/wkv7/reference.py) and are re-exported here: `wkv7`, the
sequential scan (decode steps, the reference), and `wkv7_chunked`, the matrix
form per chunk (the 'xla' training path). `wkv7_apply` picks one of them or the
kernel (`pallas_kernels.wkv7.wkv7_pallas`) from a resolved implementation.

Shapes (layers/__init__.py): b batch, t sequence, h heads, d head size, B chunk length.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from layers.attention.implementations import dividing_spec
from pallas_kernels.wkv7 import Wkv7Config, unsupported_reason, wkv7_pallas
from pallas_kernels.wkv7.reference import unit_lower_inverse, wkv7, wkv7_chunked

__all__ = ["IMPLEMENTATIONS", "resolve_impl", "unit_lower_inverse", "wkv7", "wkv7_apply",
           "wkv7_chunked"]

IMPLEMENTATIONS = ("auto", "xla", "pallas")
INTERPRET_CHIP = "tpu_v5e"  # the kernel interpreted on CPU ('pallas' with no chip)


def resolve_impl(impl: str, *, chip: str, head_size: int, chunk_size: int) -> str:
  """'auto' -> 'pallas' where `chip` is a kernel target ('' on CPU) the kernel serves
  (head size, chunk length), else 'xla'; 'xla' and 'pallas' pass through.

  Call outside jit (the model does, from its static fields). The WKV-7 inputs are
  float32 in the time mix, so the dtype never rules the kernel out.

  Raises:
    ValueError: naming `model.rwkv_impl` (and the fix) for an unknown name, or for
      'pallas' with a head size or chunk length the kernel cannot serve.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"model.rwkv_impl={impl!r}; choose one of {IMPLEMENTATIONS}.")
  if chunk_size == 0:
    reason = "model.chunk_size=0 (the sequential scan)"
  else:
    reason = unsupported_reason(head_size, jnp.float32, chunk_size)
    reason = reason and f"{reason}: model.head_size={head_size}, model.chunk_size={chunk_size}"
  if impl == "auto":
    return "pallas" if chip and reason is None else "xla"
  if impl == "pallas" and reason is not None:
    raise ValueError(f"model.rwkv_impl='pallas' cannot serve {reason}. Set model.rwkv_impl="
                     "'xla' (or 'auto'), or a head size / chunk length the kernel takes.")
  return impl


def wkv7_apply(r, w, k, v, a, b, *, impl: str, chip: str = "", chunk_size: int,
               doc: jax.Array | None = None,
               initial_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The WKV-7 recurrence by a resolved implementation ('xla' or 'pallas').

  A call of one token (t = 1: decode steps) or chunk_size 0 takes the sequential
  `wkv7` whatever `impl`; otherwise 'xla' runs `wkv7_chunked` and 'pallas' the
  kernel for `chip` ('' : interpreted on CPU as INTERPRET_CHIP).

  Args:
    r, w, k, v, a, b: [b, t, h, d]; doc int [b, t] or None; initial_state float32
      [b, h, d, d] or None: as `wkv7`.
  Returns:
    (y [b, t, h, d] in r.dtype, the float32 state after the last token [b, h, d, d]).
  """
  if impl not in ("xla", "pallas"):
    raise ValueError(f"Unresolved rwkv impl {impl!r}; expected 'xla' or 'pallas' "
                     "(resolve_impl turns 'auto' into one).")
  if chunk_size == 0 or r.shape[1] == 1:
    return wkv7(r, w, k, v, a, b, doc=doc, initial_state=initial_state)
  if impl == "xla":
    return wkv7_chunked(r, w, k, v, a, b, chunk_size=chunk_size, doc=doc,
                        initial_state=initial_state)
  return _pallas_per_shard(r, w, k, v, a, b, doc, initial_state,
                           config=Wkv7Config(chip or INTERPRET_CHIP, chunk_size),
                           interpret=not chip)


def _pallas_per_shard(r, w, k, v, a, b, doc, initial_state, *, config, interpret):
  """wkv7_pallas, under a mesh per shard (shard_map) of the axes 'batch' and 'heads' map
  to, so the partitioner never gathers the kernel's inputs (heads are independent)."""
  run = lambda *xs: wkv7_pallas(*xs[:6], doc=xs[6], initial_state=xs[7],  # noqa: E731
                                config=config, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return run(r, w, k, v, a, b, doc, initial_state)
  batch, t, h, d = r.shape
  if doc is None:
    doc = jnp.zeros((batch, t), jnp.int32)
  if initial_state is None:
    initial_state = jnp.zeros((batch, h, d, d), jnp.float32)
  x_spec = dividing_spec(("batch", None, "heads", None), r.shape, mesh)
  state_spec = PartitionSpec(x_spec[0], x_spec[2], None, None)
  return jax.shard_map(run, mesh=mesh,
                       in_specs=(x_spec,) * 6 + (PartitionSpec(x_spec[0], None), state_spec),
                       out_specs=(x_spec, state_spec), check_vma=False)(
                           r, w, k, v, a, b, doc, initial_state)
