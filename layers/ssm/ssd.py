"""The SSD scan (Mamba-2) and its implementation switch: 'xla' | 'pallas' | 'auto'.

'xla' is the chunked jnp form (pallas_kernels/ssd/reference.py, where the maths
is described); 'pallas' the kernels of pallas_kernels/ssd (Mosaic TPU; on
Hopper Mosaic GPU, whose float32 backward is the Triton one, or
`gpu_kernel='triton'` for Triton both ways). Both return the same (y, final state) and
gradients up to rounding.

Shapes (layers/__init__.py): b batch, t sequence, h heads, d head dim, N state
size, ng B/C groups.
"""

import jax
from jax.sharding import PartitionSpec

from layers.attention.implementations import dividing_spec
from pallas_kernels import ssd as ssd_kernels
from pallas_kernels.common.config import CHIPS
from pallas_kernels.ssd.reference import document_index
from pallas_kernels.ssd.reference import ssd as ssd_xla

IMPLEMENTATIONS = ("auto", "xla", "pallas")

__all__ = ["IMPLEMENTATIONS", "document_index", "resolve_impl", "ssd", "ssd_xla"]


def resolve_impl(impl: str, *, backend: str, chip: str, head_dim: int, state_size: int,
                 chunk_size: int, dtype, gpu_kernel: str = "mosaic") -> str:
  """'xla' or 'pallas' for `impl` on `backend` ('cpu', 'tpu', 'cuda', ...) and `chip`.

  'auto' is 'pallas' where a kernel targets the chip (a TPU or a Hopper GPU,
  named by `chip`) and serves these shapes, else 'xla' (CPU runs the jnp form:
  a Pallas kernel there would be interpreted). 'pallas' on CPU runs the kernel
  in interpret mode (tests). gpu_kernel: pallas_kernels.ssd.SsdConfig.gpu_kernel.

  Raises:
    ValueError: naming model.ssm_impl, for an unknown name, or 'pallas' with
      shapes the chip's kernel cannot serve.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"model.ssm_impl={impl!r}; choose one of {IMPLEMENTATIONS}.")
  on_chip = backend in ("tpu", "cuda", "gpu") and chip in CHIPS
  platform = CHIPS[chip][0] if chip in CHIPS else "tpu"  # CPU interprets the TPU kernel.
  reason = ssd_kernels.unsupported(platform, head_dim=head_dim, state_size=state_size,
                                   chunk_size=chunk_size, dtype=dtype, gpu_kernel=gpu_kernel)
  if impl == "auto":
    return "pallas" if on_chip and reason is None else "xla"
  if impl == "pallas" and reason:
    raise ValueError(f"model.ssm_impl='pallas': the {platform.upper()} SSD kernel cannot "
                     f"serve this model: {reason}. Set model.ssm_impl='xla' (or 'auto'), or "
                     "change that size.")
  return impl


def ssd(x: jax.Array, dt: jax.Array, a: jax.Array, bmat: jax.Array, cmat: jax.Array,
        d_skip: jax.Array, *, chunk_size: int, segment_ids: jax.Array | None = None,
        initial_state: jax.Array | None = None,
        initial_segment_ids: jax.Array | None = None, impl: str = "xla",
        chip: str = "", gpu_kernel: str = "mosaic") -> tuple[jax.Array, jax.Array]:
  """The SSD scan of a whole sequence: (y [b, t, h, d] in x.dtype, final state f32 [b, h, d, N]).

  Args: as pallas_kernels.ssd.reference.ssd (x [b, t, h, d], dt [b, t, h], a [h],
    bmat/cmat [b, t, ng, N], d_skip [h], chunk_size, segment_ids [b, t],
    initial_state [b, h, d, N], initial_segment_ids [b]), plus
    impl: 'xla' or 'pallas' (resolve 'auto' with `resolve_impl` first).
    chip: the kernel's target (common.config.CHIPS); '' runs the TPU kernel
      in interpret mode (CPU).
    gpu_kernel: on a GPU chip, 'mosaic' or 'triton' (SsdConfig.gpu_kernel).
  """
  kw = dict(chunk_size=chunk_size, segment_ids=segment_ids, initial_state=initial_state,
            initial_segment_ids=initial_segment_ids)
  if impl == "xla":
    return ssd_xla(x, dt, a, bmat, cmat, d_skip, **kw)
  if impl != "pallas":
    raise ValueError(f"ssd impl={impl!r}; resolve it to 'xla' or 'pallas' first.")
  config = ssd_kernels.SsdConfig(chip or "tpu_v5e", gpu_kernel=gpu_kernel)

  def scan(x, dt, a, bmat, cmat, d_skip, initial_state, segment_ids, initial_segment_ids):
    return ssd_kernels.ssd(x, dt, a, bmat, cmat, d_skip, chunk_size=chunk_size,
                           segment_ids=segment_ids, initial_state=initial_state,
                           initial_segment_ids=initial_segment_ids, interpret=not chip,
                           config=config)

  args = (x, dt, a, bmat, cmat, d_skip, initial_state, segment_ids, initial_segment_ids)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return scan(*args)
  in_specs, out_specs = _shard_specs(x.shape, bmat.shape[2], mesh)
  in_specs = tuple(None if arg is None else spec for arg, spec in zip(args, in_specs))
  return jax.shard_map(scan, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)


def _shard_specs(x_shape, num_groups: int, mesh):
  """shard_map specs of the kernel call: batch over 'batch''s mesh axes, heads over
  'heads''s where each shard's heads keep their B/C groups (groups split the same way, or
  one group); else heads whole. The kernel never sees a gathered input."""
  spec = dividing_spec(("batch", None, "heads", None), x_shape, mesh)
  batch, heads = spec[0], spec[2]
  if heads is not None:
    names = (heads,) if isinstance(heads, str) else tuple(heads)
    ways = 1
    for name in names:
      ways *= mesh.shape[name]
    if num_groups != 1 and num_groups % ways:
      heads = None  # A shard's heads would need groups from other shards.
  groups = heads if num_groups != 1 else None
  x_spec = PartitionSpec(batch, None, heads, None)
  per_head = PartitionSpec(heads)
  state = PartitionSpec(batch, heads, None, None)
  in_specs = (x_spec, PartitionSpec(batch, None, heads), per_head,
              PartitionSpec(batch, None, groups, None), PartitionSpec(batch, None, groups, None),
              per_head, state, PartitionSpec(batch, None), PartitionSpec(batch))
  return in_specs, (x_spec, state)
