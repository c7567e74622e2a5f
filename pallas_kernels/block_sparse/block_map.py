"""Block maps: which kv tiles each kernel visits, precomputed once in numpy.

Legend: layers/__init__.py.

    block_map = build_block_map(CausalMask() & LocalMask(4096, 0), q_len=t,
                                kv_len=s, num_q_heads=h, num_kv_heads=k,
                                head_dim=d, config=config)
    out = block_sparse_attention(q, k, v, block_map, config=config)

A mask says which (query, key) pairs are visible; a block map turns it into,
per kernel (forward, dq, dk/dv) and per row of tiles, the list of tiles to
visit, each FULL (no masking work) or PARTIAL (an element mask, deduplicated:
a causal diagonal stores one tile). Tiles with no visible pair are absent, so
the kernels do no work and no memory traffic for them.

Heads of a mask (GQA): a mask with one pattern serves every head. A per-head
BlockMask has either num_q_heads patterns (one per query head) or, when that
differs, num_kv_heads patterns (one per kv head, shared by the query heads of
its group, as NSA-style selection does).

Padding: the kernels pad t and s to whole tiles; padded keys are masked (the
element masks hold them), padded queries are don't-care rows (their outputs
are dropped and their cotangents are zero).

`build_block_map` is cached by its arguments (masks are hashable), so calling
`block_sparse_attention` with a Mask in a training step builds the map once,
when the step is first traced. `BlockMap.build_seconds` reports the cost.
"""

import dataclasses
import functools
import time

import numpy as np

from pallas_kernels.block_sparse.masks import FULL, PARTIAL, SKIP, Mask
from pallas_kernels.common import config as config_lib
from pallas_kernels.common import gpu_cta
from pallas_kernels.common.plan import make_plan


@dataclasses.dataclass(frozen=True, eq=False)
class KernelMap:
  """The tiles one kernel visits, per (mask head, row of tiles).

  Rows are query tiles (forward, dq) or key tiles (dk/dv, `transposed`).
  Entry e of a row names a column tile: the kv block (forward, dq) or, for
  dk/dv, `g * num_col_blocks + q_block` with g the query head within the kv
  head's group. Rows are padded with their last entry (so a pipelined fetch of
  a padded step is a repeat, not a new copy).

  Attributes:
    index: int32 [heads, rows, steps]: column tile of each entry.
    mask_id: int32 [heads, rows, steps]: -1 FULL, else the PARTIAL tile's row
      in partial_masks.
    mask_fetch: int32 [heads, rows, steps]: mask_id with FULL entries holding
      the previous partial id (what a pipeline fetches: no new copy).
    counts: int32 [heads, rows]: real entries per row.
    partial_masks: int8 [T, block_rows, block_cols] (T >= 1; 1 visible),
      transposed (keys as rows) for dk/dv.
    block_rows, block_cols: tile shape.
    head_div: kernel head -> map head is head // head_div (query heads for
      forward and dq, kv heads for dk/dv).
    transposed: rows are key tiles.
  """
  index: np.ndarray
  mask_id: np.ndarray
  mask_fetch: np.ndarray
  counts: np.ndarray
  partial_masks: np.ndarray
  block_rows: int
  block_cols: int
  head_div: int
  transposed: bool

  @property
  def max_steps(self) -> int:
    return self.index.shape[-1]

  @property
  def num_rows(self) -> int:
    return self.index.shape[1]

  def arrays(self):
    """(index, mask_id, mask_fetch, counts) flattened to 1-D (scalar prefetch)."""
    return tuple(x.reshape(-1) for x in (self.index, self.mask_id, self.mask_fetch,
                                         self.counts))


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMap:
  """A mask's block maps for one problem geometry (hashable by identity).

  Attributes:
    mask: the Mask it was built from.
    q_len, kv_len, num_q_heads, num_kv_heads, head_dim: the problem.
    config: the resolved FlashAttentionConfig; interpret: built for interpret mode.
    padded_q_len, padded_kv_len: kernel lengths.
    fwd, dq, dkv: KernelMap of each kernel.
    visible_pairs: visible (query, key) pairs summed over query heads (the
      useful-FLOP count: forward FLOPs are 4 * d * visible_pairs per batch).
    build_seconds: wall time of the build.
  """
  mask: Mask
  q_len: int
  kv_len: int
  num_q_heads: int
  num_kv_heads: int
  head_dim: int
  config: config_lib.FlashAttentionConfig
  interpret: bool
  padded_q_len: int
  padded_kv_len: int
  fwd: KernelMap
  dq: KernelMap
  dkv: KernelMap
  visible_pairs: int
  build_seconds: float

  def density(self, kernel: str = "fwd") -> float:
    """Visited tiles / all tiles of a kernel (1.0 = dense)."""
    m = getattr(self, kernel)
    heads = self.num_q_heads if kernel != "dkv" else self.num_kv_heads
    group = self.num_q_heads // self.num_kv_heads if kernel == "dkv" else 1
    cols = (self.padded_q_len if kernel == "dkv" else self.padded_kv_len) // m.block_cols
    per_head = m.counts.sum(axis=1)
    visited = per_head.sum() * (heads // m.counts.shape[0])
    return float(visited) / (heads * m.num_rows * cols * group)


def mask_heads_for(mask: Mask, num_q_heads: int, num_kv_heads: int) -> str:
  """'shared', 'q' (one pattern per query head) or 'kv' (one per kv head)."""
  n = mask.num_heads
  if n == 1:
    return "shared"
  if n == num_q_heads:
    return "q"
  if n == num_kv_heads:
    return "kv"
  raise ValueError(f"mask has {n} heads; it needs 1, num_q_heads={num_q_heads} or "
                   f"num_kv_heads={num_kv_heads}.")


def _classify(mask: Mask, head: int, *, q_len, kv_len, rows, cols, num_rows, num_cols):
  """Tile kinds [num_rows, num_cols] and {(i, j): bool tile} of PARTIAL tiles."""
  r0 = (np.arange(num_rows) * rows)[:, None]
  c0 = (np.arange(num_cols) * cols)[None, :]
  r1, c1 = np.minimum(r0 + rows, q_len) - 1, np.minimum(c0 + cols, kv_len) - 1
  kinds = mask.tile_kinds(r0, r1, c0, c1, head).copy()
  kinds[np.broadcast_to((r1 < r0) | (c1 < c0), kinds.shape)] = SKIP
  kinds[(kinds == FULL) & np.broadcast_to(c0 + cols > kv_len, kinds.shape)] = PARTIAL
  tiles = {}
  row_pos, col_pos = np.arange(rows)[:, None], np.arange(cols)[None, :]
  for i, j in zip(*np.nonzero(kinds == PARTIAL)):
    q_pos, kv_pos = i * rows + row_pos, j * cols + col_pos
    tile = np.broadcast_to(mask.visible(q_pos, kv_pos, head), (rows, cols))
    tile = tile & (q_pos < q_len) & (kv_pos < kv_len)
    real = tile[:max(0, min(rows, q_len - i * rows))]
    if not real.any():
      kinds[i, j] = SKIP
    elif real.all():
      kinds[i, j] = FULL
    else:
      tiles[(int(i), int(j))] = tile
  return kinds, tiles


class _Dedup:
  """Unique int8 tiles; id of each."""

  def __init__(self, shape):
    self.ids, self.tiles, self.shape = {}, [], shape

  def add(self, tile) -> int:
    tile = np.ascontiguousarray(tile, dtype=np.int8)
    key = tile.tobytes()
    if key not in self.ids:
      self.ids[key] = len(self.tiles)
      self.tiles.append(tile)
    return self.ids[key]

  def array(self):
    return np.stack(self.tiles) if self.tiles else np.ones((1, *self.shape), np.int8)


def _pack(rows_entries, *, block_rows, block_cols, dedup, head_div, transposed):
  """KernelMap from [heads][rows] lists of (column, mask_id)."""
  steps = max(1, max(len(r) for head in rows_entries for r in head))
  shape = (len(rows_entries), len(rows_entries[0]), steps)
  index, mask_id = np.zeros(shape, np.int32), np.full(shape, -1, np.int32)
  fetch, counts = np.zeros(shape, np.int32), np.zeros(shape[:2], np.int32)
  for h, head in enumerate(rows_entries):
    for r, entries in enumerate(head):
      counts[h, r] = len(entries)
      last_mask = 0
      for e in range(steps):
        col, mid = entries[min(e, len(entries) - 1)] if entries else (0, -1)
        index[h, r, e] = col
        if e < len(entries):
          mask_id[h, r, e] = mid
          last_mask = mid if mid >= 0 else last_mask
        fetch[h, r, e] = last_mask
  return KernelMap(index, mask_id, fetch, counts, dedup.array(), block_rows, block_cols,
                   head_div, transposed)


def _row_map(classified, *, rows, cols, head_div):
  """Forward / dq map: per (mask head, query tile) the visited kv tiles."""
  dedup, heads = _Dedup((rows, cols)), []
  for kinds, tiles in classified:
    head = []
    for i in range(kinds.shape[0]):
      head.append([(int(j), dedup.add(tiles[(i, int(j))]) if kinds[i, j] == PARTIAL else -1)
                   for j in np.nonzero(kinds[i])[0]])
    heads.append(head)
  return _pack(heads, block_rows=rows, block_cols=cols, dedup=dedup, head_div=head_div,
               transposed=False)


def _transposed_map(classified_of_q_head, *, num_kv_heads, group, per_kv_head, rows,
                    cols):
  """dk/dv map: per (map kv head, key tile) the (group head, query tile) entries.

  classified_of_q_head(h) -> (kinds [q tiles, kv tiles], tiles) for query head h at
  (cols x rows) tiles.
  """
  dedup, heads = _Dedup((rows, cols)), []
  for kh in range(num_kv_heads if per_kv_head else 1):
    per_g = [classified_of_q_head(kh * group + g) for g in range(group)]
    num_q_tiles, num_kv_tiles = per_g[0][0].shape
    head = []
    for j in range(num_kv_tiles):
      entries = []
      for g, (kinds, tiles) in enumerate(per_g):
        for i in np.nonzero(kinds[:, j])[0]:
          mid = dedup.add(tiles[(int(i), j)].T) if kinds[i, j] == PARTIAL else -1
          entries.append((g * num_q_tiles + int(i), mid))
      head.append(entries)
    heads.append(head)
  return _pack(heads, block_rows=rows, block_cols=cols, dedup=dedup,
               head_div=1 if per_kv_head else num_kv_heads, transposed=True)


def kernel_tiles(plan, platform: str, wgs: int):
  """(rows, cols) per kernel: the tiles a block map describes for `plan`.

  GPU maps describe CTA tiles: the forward and dq CTAs cover 2 (forward) or
  `wgs` (backward) warpgroups' query rows; the dk/dv CTA `wgs` * block_kv rows.
  """
  if platform == "gpu":
    return ((gpu_cta.COMPUTE_WGS * plan.fwd.block_q, plan.fwd.block_kv),
            (wgs * plan.dq.block_q, plan.dq.block_kv),
            (wgs * plan.dkv.block_kv, plan.dkv.block_q))
  return ((plan.fwd.block_q, plan.fwd.block_kv), (plan.dq.block_q, plan.dq.block_kv),
          (plan.dkv.block_kv, plan.dkv.block_q))


def build_block_map(mask: Mask, *, q_len: int, kv_len: int, num_q_heads: int,
                    num_kv_heads: int | None = None, head_dim: int,
                    config: config_lib.FlashAttentionConfig, interpret=False) -> BlockMap:
  """The block maps of `mask` for one problem geometry and config (cached).

  Args:
    mask: a Mask (masks.py).
    q_len, kv_len: t and s; num_q_heads, num_kv_heads: h and k (default h).
    head_dim: d (picks the config's block sizes).
    config: FlashAttentionConfig (its chip picks the kernel family).
    interpret: whether the kernels will be interpreted (TPU tiles then shrink
      to short sequences by multiples of 8 instead of 128).

  Returns:
    A BlockMap; pass it to block_sparse_attention in place of the mask.

  Raises:
    ValueError: naming the argument, for a non-Mask, bad lengths or heads.
  """
  if not isinstance(mask, Mask):
    raise ValueError(f"mask={mask!r} must be a block_sparse.masks.Mask.")
  num_kv_heads = num_q_heads if num_kv_heads is None else num_kv_heads
  for name, value in (("q_len", q_len), ("kv_len", kv_len), ("num_q_heads", num_q_heads),
                      ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{name}={value!r} must be a positive int.")
  if num_q_heads % num_kv_heads:
    raise ValueError(f"num_q_heads={num_q_heads} must be a multiple of "
                     f"num_kv_heads={num_kv_heads}.")
  if not isinstance(config, config_lib.FlashAttentionConfig):
    raise ValueError(f"config={config!r} must be a FlashAttentionConfig.")
  mask_heads_for(mask, num_q_heads, num_kv_heads)
  interpret = bool(interpret)  # Only whether (TPU tiles shrink when interpreted).
  return _build(mask, int(q_len), int(kv_len), int(num_q_heads), int(num_kv_heads),
                int(head_dim), config, interpret)


@functools.lru_cache(maxsize=64)
def _build(mask, q_len, kv_len, num_q_heads, num_kv_heads, head_dim, config, interpret):
  start = time.perf_counter()
  cfg = config.resolve(head_dim)
  dtype = "bfloat16" if cfg.platform == "gpu" else "float32"
  plan = make_plan(cfg, q_len, kv_len, num_q_heads // num_kv_heads, (None, None),
                   False, 1.0, interpret, dtype)
  tq, tk = plan.fwd.padded_q_len, plan.fwd.padded_kv_len
  group = num_q_heads // num_kv_heads
  which = mask_heads_for(mask, num_q_heads, num_kv_heads)
  mask_head = {"shared": lambda h: 0, "q": lambda h: h, "kv": lambda h: h // group}[which]
  (fr, fc), (qr, qc), (kr, kc) = kernel_tiles(plan, cfg.platform, cfg.compute_wgs_bwd or 1)

  @functools.lru_cache(maxsize=None)
  def classify(head, rows, cols):
    return _classify(mask, head, q_len=q_len, kv_len=kv_len, rows=rows, cols=cols,
                     num_rows=tq // rows, num_cols=tk // cols)

  q_heads = {"shared": [0], "q": range(num_q_heads), "kv": range(num_kv_heads)}[which]
  head_div = {"shared": num_q_heads, "q": 1, "kv": group}[which]
  fwd = _row_map([classify(h, fr, fc) for h in q_heads], rows=fr, cols=fc, head_div=head_div)
  dq = _row_map([classify(h, qr, qc) for h in q_heads], rows=qr, cols=qc, head_div=head_div)
  dkv = _transposed_map(lambda h: classify(mask_head(h), kc, kr), num_kv_heads=num_kv_heads,
                        group=group, per_kv_head=which != "shared", rows=kr, cols=kc)
  pairs = _visible_pairs(classify, q_heads, fr, fc, q_len=q_len, kv_len=kv_len)
  pairs *= num_q_heads // len(q_heads)
  return BlockMap(mask, q_len, kv_len, num_q_heads, num_kv_heads, head_dim, cfg, interpret,
                  tq, tk, fwd, dq, dkv, pairs, time.perf_counter() - start)


def _visible_pairs(classify, heads, rows, cols, *, q_len, kv_len):
  """Visible (real query, key) pairs summed over the map's heads."""
  total = 0
  for h in heads:
    kinds, tiles = classify(h, rows, cols)
    nr, nc = kinds.shape
    real_rows = np.clip(q_len - np.arange(nr) * rows, 0, rows)[:, None]
    real_cols = np.clip(kv_len - np.arange(nc) * cols, 0, cols)[None, :]
    total += int(np.sum(np.where(kinds == FULL, real_rows * real_cols, 0)))
    total += sum(int(t.sum()) for t in tiles.values())
  return total


def density_of(mask: Mask, q_len: int, kv_len: int, block: int) -> float:
  """Fraction of (block x block) tiles with a visible pair (head 0), for reports."""
  n_r, n_c = -(-q_len // block), -(-kv_len // block)
  kinds, _ = _classify(mask, 0, q_len=q_len, kv_len=kv_len, rows=block, cols=block,
                       num_rows=n_r, num_cols=n_c)
  return float(np.mean(kinds != SKIP))
