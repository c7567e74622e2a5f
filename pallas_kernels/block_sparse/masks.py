"""Attention masks as static, hashable objects, composable with `&` and `|`.

    mask = CausalMask() & LocalMask(1024, 0) | PrefixLMMask(64)
    dense = mask.dense(q_len, kv_len)          # bool [t, s] (head 0)
    per_head = mask.dense(q_len, kv_len, num_heads=h)   # bool [h, t, s]

Query i sees key j when the mask is True at (i, j). Positions are absolute and
top-left aligned (query 0 faces key 0), like jax.nn.dot_product_attention.

Every mask answers two questions, both in numpy (the block map is built once,
outside jit):
  `visible(q_pos, kv_pos, head)`: elementwise bool over broadcast int arrays;
  `tile_kinds(r0, r1, c0, c1, head)`: per tile of rows [r0, r1] and columns
    [c0, c1] (inclusive, broadcast int arrays) SKIP (no pair visible), FULL
    (every pair visible) or PARTIAL ("some, or not known": the builder then
    evaluates `visible` on the tile). Never wrong about SKIP and FULL.

Heads: `num_heads` is 1 for a mask shared by all heads. A BlockMask may carry
one pattern per head; see block_map.build_block_map for how its heads
meet query and kv heads (GQA).
"""

import dataclasses

import numpy as np

SKIP, PARTIAL, FULL = 0, 1, 2


class Mask:
  """Base class: composition, dense form, heads. Subclasses are frozen dataclasses."""

  num_heads = 1

  def visible(self, q_pos, kv_pos, head: int = 0):
    raise NotImplementedError

  def tile_kinds(self, r0, r1, c0, c1, head: int = 0):
    """Default: nothing known (PARTIAL everywhere); subclasses do better."""
    return np.full(np.broadcast_shapes(np.shape(r0), np.shape(c0)), PARTIAL, np.int8)

  def __and__(self, other):
    return AndMask(self, _check_mask(other, "&"))

  def __or__(self, other):
    return OrMask(self, _check_mask(other, "|"))

  def dense(self, q_len: int, kv_len: int, num_heads: int | None = None):
    """bool [q_len, kv_len] for head 0, or [num_heads, q_len, kv_len].

    A mask with one pattern is repeated over num_heads; a per-head mask needs
    num_heads equal to its own number of heads.
    """
    q_pos, kv_pos = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    if num_heads is None:
      return np.broadcast_to(self.visible(q_pos, kv_pos, 0), (q_len, kv_len)).copy()
    if self.num_heads not in (1, num_heads):
      raise ValueError(f"num_heads={num_heads} does not match the mask's "
                       f"{self.num_heads} heads.")
    return np.stack([np.broadcast_to(self.visible(q_pos, kv_pos, h), (q_len, kv_len))
                     for h in range(num_heads)])


def _check_mask(other, op):
  if not isinstance(other, Mask):
    raise TypeError(f"cannot combine a Mask with {type(other).__name__} by {op!r}.")
  return other


def _const(kind, r0, c0):
  return np.full(np.broadcast_shapes(np.shape(r0), np.shape(c0)), kind, np.int8)


def _kinds(full, skip):
  """int8 kinds from bool 'surely full' / 'surely empty' arrays."""
  full, skip = np.broadcast_arrays(full, skip)
  return np.where(skip, SKIP, np.where(full, FULL, PARTIAL)).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class FullMask(Mask):
  """Every query sees every key."""

  def visible(self, q_pos, kv_pos, head=0):
    return np.ones(np.broadcast_shapes(np.shape(q_pos), np.shape(kv_pos)), bool)

  def tile_kinds(self, r0, r1, c0, c1, head=0):
    return _const(FULL, r0, c0)


@dataclasses.dataclass(frozen=True)
class CausalMask(Mask):
  """Query i sees key j iff j <= i."""

  def visible(self, q_pos, kv_pos, head=0):
    return kv_pos <= q_pos

  def tile_kinds(self, r0, r1, c0, c1, head=0):
    return _kinds(full=c1 <= r0, skip=c0 > r1)


@dataclasses.dataclass(frozen=True)
class LocalMask(Mask):
  """Query i sees keys i - left ... i + right (either side may be negative).

  Attributes:
    left, right: ints; LocalMask(w, 0) is a causal sliding window of w + 1 keys.
  """
  left: int
  right: int

  def __post_init__(self):
    for name in ("left", "right"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"LocalMask {name}={value!r} must be an int.")
    object.__setattr__(self, "left", int(self.left))
    object.__setattr__(self, "right", int(self.right))

  def visible(self, q_pos, kv_pos, head=0):
    return (kv_pos >= q_pos - self.left) & (kv_pos <= q_pos + self.right)

  def tile_kinds(self, r0, r1, c0, c1, head=0):
    full = (c0 >= r1 - self.left) & (c1 <= r0 + self.right)
    skip = (c1 < r0 - self.left) | (c0 > r1 + self.right)
    return _kinds(full, skip)


@dataclasses.dataclass(frozen=True)
class ChunkedCausalMask(Mask):
  """Causal inside chunks of `chunk` tokens: j <= i and i // chunk == j // chunk."""
  chunk: int

  def __post_init__(self):
    if not isinstance(self.chunk, (int, np.integer)) or self.chunk <= 0:
      raise ValueError(f"ChunkedCausalMask chunk={self.chunk!r} must be a positive int.")
    object.__setattr__(self, "chunk", int(self.chunk))

  def visible(self, q_pos, kv_pos, head=0):
    return (kv_pos <= q_pos) & (q_pos // self.chunk == kv_pos // self.chunk)

  def tile_kinds(self, r0, r1, c0, c1, head=0):
    n = self.chunk
    one_chunk = np.minimum(r0, c0) // n == np.maximum(r1, c1) // n
    disjoint = (r1 // n < c0 // n) | (c1 // n < r0 // n)
    return _kinds(full=(c1 <= r0) & one_chunk, skip=(c0 > r1) | disjoint)


@dataclasses.dataclass(frozen=True)
class PrefixLMMask(Mask):
  """Bidirectional over the first prefix_len keys, causal after: j < prefix_len or j <= i."""
  prefix_len: int

  def __post_init__(self):
    if not isinstance(self.prefix_len, (int, np.integer)) or self.prefix_len < 0:
      raise ValueError(f"PrefixLMMask prefix_len={self.prefix_len!r} must be an int >= 0.")
    object.__setattr__(self, "prefix_len", int(self.prefix_len))

  def visible(self, q_pos, kv_pos, head=0):
    return (kv_pos < self.prefix_len) | (kv_pos <= q_pos)

  def tile_kinds(self, r0, r1, c0, c1, head=0):
    p = self.prefix_len
    return _kinds(full=(c1 < p) | (c1 <= r0), skip=(c0 >= p) & (c0 > r1))


class BlockMask(Mask):
  """An arbitrary pattern of blocks, shared by all heads or one per head.

  Attributes:
    blocks: bool [heads, q_blocks, kv_blocks] (read-only copy); heads = 1 is
      shared by all heads. Query i sees key j iff
      blocks[head, i // block_q, j // block_kv]; positions past the pattern see
      nothing.
    block_q, block_kv: block size in tokens (block_size: an int or a pair).

  Pick block sizes that are multiples of the kernels' tiles (128 tokens on
  Hopper, 512 with the TPU tables): then every tile is FULL or absent. Finer
  patterns are correct but make most tiles PARTIAL (element masks to build,
  store and apply).
  """

  def __init__(self, blocks, block_size):
    arr = np.asarray(blocks)
    if arr.ndim == 2:
      arr = arr[None]
    if arr.ndim != 3 or arr.dtype != np.bool_:
      raise ValueError(f"BlockMask blocks must be bool [heads, q_blocks, kv_blocks]; "
                       f"got {arr.dtype} {arr.shape}.")
    if min(arr.shape) == 0:
      raise ValueError(f"BlockMask blocks has an empty axis: {arr.shape}.")
    sizes = (block_size, block_size) if np.ndim(block_size) == 0 else tuple(block_size)
    if len(sizes) != 2 or any(not isinstance(x, (int, np.integer)) or x <= 0 for x in sizes):
      raise ValueError(f"BlockMask block_size={block_size!r} must be a positive int or "
                       "a pair of them.")
    arr = np.ascontiguousarray(arr)
    arr.flags.writeable = False
    self.blocks = arr
    self.block_q, self.block_kv = int(sizes[0]), int(sizes[1])
    self.num_heads = arr.shape[0]
    self._key = (arr.shape, arr.tobytes(), self.block_q, self.block_kv)
    # Inclusive 2-D prefix sums: the count of True blocks in any rectangle.
    self._sums = np.pad(arr.astype(np.int64).cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, BlockMask) and self._key == other._key

  def __repr__(self):
    return (f"BlockMask(heads={self.num_heads}, blocks={self.blocks.shape[1:]}, "
            f"block_size=({self.block_q}, {self.block_kv}), "
            f"density={self.blocks.mean():.3f})")

  def visible(self, q_pos, kv_pos, head=0):
    h = head if self.num_heads > 1 else 0
    nq, nk = self.blocks.shape[1:]
    qb, kb = np.asarray(q_pos) // self.block_q, np.asarray(kv_pos) // self.block_kv
    inside = (qb < nq) & (kb < nk)
    return self.blocks[h, np.minimum(qb, nq - 1), np.minimum(kb, nk - 1)] & inside

  def tile_kinds(self, r0, r1, c0, c1, head=0):
    h = head if self.num_heads > 1 else 0
    nq, nk = self.blocks.shape[1:]
    br0, bc0 = np.minimum(r0 // self.block_q, nq), np.minimum(c0 // self.block_kv, nk)
    br1, bc1 = np.minimum(r1 // self.block_q + 1, nq), np.minimum(c1 // self.block_kv + 1, nk)
    s = self._sums[h]
    ones = s[br1, bc1] - s[br0, bc1] - s[br1, bc0] + s[br0, bc0]
    cells = np.maximum(br1 - br0, 0) * np.maximum(bc1 - bc0, 0)
    whole = (br1 - br0 == r1 // self.block_q - r0 // self.block_q + 1) & (
        bc1 - bc0 == c1 // self.block_kv - c0 // self.block_kv + 1)
    return _kinds(full=whole & (ones == cells), skip=ones == 0)


def _heads_of(a: Mask, b: Mask) -> int:
  if a.num_heads != b.num_heads and 1 not in (a.num_heads, b.num_heads):
    raise ValueError(f"cannot combine masks with {a.num_heads} and {b.num_heads} heads.")
  return max(a.num_heads, b.num_heads)


@dataclasses.dataclass(frozen=True)
class AndMask(Mask):
  """Visible where both masks are (from `a & b`)."""
  a: Mask
  b: Mask

  def __post_init__(self):
    object.__setattr__(self, "num_heads", _heads_of(self.a, self.b))

  def visible(self, q_pos, kv_pos, head=0):
    return self.a.visible(q_pos, kv_pos, head) & self.b.visible(q_pos, kv_pos, head)

  def tile_kinds(self, r0, r1, c0, c1, head=0):
    ka, kb = self.a.tile_kinds(r0, r1, c0, c1, head), self.b.tile_kinds(r0, r1, c0, c1, head)
    return _kinds(full=(ka == FULL) & (kb == FULL), skip=(ka == SKIP) | (kb == SKIP))


@dataclasses.dataclass(frozen=True)
class OrMask(Mask):
  """Visible where either mask is (from `a | b`)."""
  a: Mask
  b: Mask

  def __post_init__(self):
    object.__setattr__(self, "num_heads", _heads_of(self.a, self.b))

  def visible(self, q_pos, kv_pos, head=0):
    return self.a.visible(q_pos, kv_pos, head) | self.b.visible(q_pos, kv_pos, head)

  def tile_kinds(self, r0, r1, c0, c1, head=0):
    ka, kb = self.a.tile_kinds(r0, r1, c0, c1, head), self.b.tile_kinds(r0, r1, c0, c1, head)
    return _kinds(full=(ka == FULL) | (kb == FULL), skip=(ka == SKIP) & (kb == SKIP))


def random_block_mask(seed: int, *, q_len: int, kv_len: int, block_size: int,
                      density: float, num_heads: int = 1) -> BlockMask:
  """A BlockMask with about `density` of its blocks on (at least one per row).

  One block per query-block row is always on, so no row is empty by construction.
  """
  if not 0.0 < density <= 1.0:
    raise ValueError(f"density={density} must be in (0, 1].")
  rng = np.random.default_rng(seed)
  nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
  blocks = rng.random((num_heads, nq, nk)) < density
  blocks[:, np.arange(nq), rng.integers(0, nk, nq)] = True
  return BlockMask(blocks, block_size)
