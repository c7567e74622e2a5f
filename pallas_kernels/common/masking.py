"""Which keys a query sees, per element and per tile, and the tile geometry.

The same predicates run in the reference, in the TPU and GPU kernel bodies
(elementwise on a tile) and in the XLA prologue that decides which tiles each
kernel visits. Positions are absolute token indices.

A window is normalized to (left, right), either side None for unbounded:
query i sees key j iff i - left <= j <= i + right. Causal is right = min(right, 0).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

# Running-max start value in the kernels (log2 units). Finite, so a row that
# has seen only masked scores keeps exp2(m_old - m_new) = 1 and p = 0.
M_INIT = -1e30
# Stored log-sum-exp of a row that sees no key: exp2(s - EMPTY_ROW_LSE) = 0.
EMPTY_ROW_LSE = 1e30

Window = tuple[int | None, int | None]


def normalize_window(local_window_size, causal: bool) -> Window:
  """(left, right) with None for an unbounded side; causal caps right at 0.

  Raises:
    ValueError: naming local_window_size when it is not None, an int or a pair.
  """
  left = right = None
  if local_window_size is not None:
    if isinstance(local_window_size, (int, np.integer)):
      left = right = int(local_window_size)
    else:
      try:
        left, right = (int(w) for w in local_window_size)
      except (TypeError, ValueError):
        raise ValueError(
            f"local_window_size={local_window_size!r} must be None, an int or a "
            "(left, right) pair of ints.") from None
  if causal:
    right = 0 if right is None else min(right, 0)
  return left, right


def visible(q_pos, kv_pos, *, window: Window, kv_len: int | None = None,
            q_seg=None, kv_seg=None):
  """Elementwise bool: query at q_pos sees the key at kv_pos (broadcasting).

  kv_len masks padded keys (None: no padding). q_seg/kv_seg, when given, must
  be equal for the pair to be visible.
  """
  left, right = window
  mask = True
  if kv_len is not None:
    mask = kv_pos < kv_len
  if left is not None:
    mask = mask & (kv_pos >= q_pos - left)
  if right is not None:
    mask = mask & (kv_pos <= q_pos + right)
  if q_seg is not None:
    mask = mask & (q_seg == kv_seg)
  if mask is True:
    return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(kv_pos)), bool)
  return mask


def needs_mask(window: Window, kv_len: int, padded_kv_len: int, has_segments: bool) -> bool:
  """Whether any tile can be partly masked (else every visited tile is full)."""
  return (window != (None, None) or kv_len != padded_kv_len or has_segments)


def tile_fully_visible(q_block, kv_block, *, block_q: int, block_kv: int,
                       window: Window, kv_len: int, padded_kv_len: int):
  """Scalar bool: every (query, key) of the tile passes window and padding.

  Works on Python ints and traced int32 scalars (program ids). Segments are
  checked separately (`segments_uniform`).
  """
  first_row = q_block * block_q
  last_row = first_row + block_q - 1
  first_col = kv_block * block_kv
  last_col = first_col + block_kv - 1
  left, right = window
  full = True
  if left is not None:
    full = full & (first_col >= last_row - left)
  if right is not None:
    full = full & (last_col <= first_row + right)
  if kv_len != padded_kv_len:
    full = full & (last_col < kv_len)
  return full


def segments_uniform(q_min, q_max, kv_min, kv_max):
  """Scalar bool: the tile's queries and keys all carry one segment id."""
  return (q_min == q_max) & (kv_min == kv_max) & (q_min == kv_min)


def _static_tile_may_see(num_q_blocks, num_kv_blocks, *, block_q, block_kv,
                         window: Window):
  """bool [num_q_blocks, num_kv_blocks] (numpy): q block i may see some key of kv block j."""
  left, right = window
  first_row = np.arange(num_q_blocks)[:, None] * block_q
  last_row = first_row + block_q - 1
  first_col = np.arange(num_kv_blocks)[None, :] * block_kv
  last_col = first_col + block_kv - 1
  may = np.ones((num_q_blocks, num_kv_blocks), bool)
  if left is not None:
    may &= last_col >= first_row - left
  if right is not None:
    may &= first_col <= last_row + right
  return may


def segment_block_stats(segment_ids, block: int):
  """Per-block (min, max) of int [b, nb * block] segment ids -> two [b, nb] int32."""
  b, length = segment_ids.shape
  blocks = segment_ids.reshape(b, length // block, block)
  return blocks.min(axis=-1).astype(jnp.int32), blocks.max(axis=-1).astype(jnp.int32)


def _hull(may_see, axis: int):
  """First and one-past-last True index along `axis` of a bool array (0, 0 if none)."""
  n = may_see.shape[axis]
  idx = jnp.arange(n, dtype=jnp.int32)
  shape = [1] * may_see.ndim
  shape[axis] = n
  idx = idx.reshape(shape)
  any_true = jnp.any(may_see, axis=axis)
  lo = jnp.min(jnp.where(may_see, idx, n), axis=axis)
  hi = jnp.max(jnp.where(may_see, idx + 1, 0), axis=axis)
  return jnp.where(any_true, lo, 0).astype(jnp.int32), jnp.where(any_true, hi, 0).astype(jnp.int32)


def block_ranges(batch: int, num_q_blocks: int, num_kv_blocks: int, *,
                 block_q: int, block_kv: int, window: Window, seg_stats=None):
  """Which tiles each kernel visits.

  Args:
    seg_stats: None or (q_min, q_max, kv_min, kv_max) from segment_block_stats.

  Returns:
    (kv_lo, kv_hi) int32 [b, num_q_blocks]: q block i visits kv blocks [lo, hi);
    (q_lo, q_hi) int32 [b, num_kv_blocks]: kv block j visits q blocks [lo, hi);
    max_kv_steps, max_q_steps: static upper bounds of hi - lo (grid extents).
    Tiles inside a range may still be wholly masked (the kernels mask them).
  """
  static = _static_tile_may_see(num_q_blocks, num_kv_blocks, block_q=block_q,
                                block_kv=block_kv, window=window)
  max_kv_steps = max(1, int(_span(static, axis=1)))
  max_q_steps = max(1, int(_span(static, axis=0)))
  may = jnp.broadcast_to(jnp.asarray(static), (batch, num_q_blocks, num_kv_blocks))
  if seg_stats is not None:
    q_min, q_max, kv_min, kv_max = seg_stats
    may = may & ((kv_min[:, None, :] <= q_max[:, :, None])
                 & (kv_max[:, None, :] >= q_min[:, :, None]))
  kv_lo, kv_hi = _hull(may, axis=2)
  q_lo, q_hi = _hull(may, axis=1)
  return (kv_lo, kv_hi), (q_lo, q_hi), max_kv_steps, max_q_steps


def _span(may_see: np.ndarray, axis: int) -> int:
  """Largest hull length of True entries along `axis` (numpy, static)."""
  n = may_see.shape[axis]
  idx = np.arange(n).reshape([-1 if a == axis else 1 for a in range(may_see.ndim)])
  lo = np.where(may_see, idx, n).min(axis=axis)
  hi = np.where(may_see, idx + 1, 0).max(axis=axis)
  return int(np.max(np.maximum(hi - lo, 0), initial=0))


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Static geometry of one kernel launch (block sizes differ per kernel).

  Attributes:
    block_q, block_kv: tile rows of q and of k/v.
    q_len, kv_len: true lengths; padded_q_len, padded_kv_len: kernel lengths.
    window: normalized (left, right), see normalize_window.
    has_segments: segment ids are given.
    scale: logit scale (natural units).
    group: query heads per kv head.
  """
  block_q: int
  block_kv: int
  q_len: int
  kv_len: int
  padded_q_len: int
  padded_kv_len: int
  window: Window
  has_segments: bool
  scale: float
  group: int

  @property
  def num_q_blocks(self) -> int:
    return self.padded_q_len // self.block_q

  @property
  def num_kv_blocks(self) -> int:
    return self.padded_kv_len // self.block_kv

  @property
  def needs_mask(self) -> bool:
    return needs_mask(self.window, self.kv_len, self.padded_kv_len, self.has_segments)

  @property
  def padded_kv(self) -> int | None:
    """kv_len when keys are padded (masked), else None."""
    return self.kv_len if self.kv_len != self.padded_kv_len else None
