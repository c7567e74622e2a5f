"""Every shipped block-sparse configuration lowers for its platform, from CPU.

As test_flash_attention_lowering.py: `jax.export` for ['cuda'] runs the
Mosaic GPU lowering (and its 227 KiB shared-memory check, which the element
mask ring adds to); for ['tpu'] the Pallas TPU lowering inside an abstract
mesh naming the chip. Binaries are built on hardware, not here.

Default set: every (platform table, head dim) entry with a mask that has
PARTIAL and FULL tiles, with and without segments (forward+backward: all three
kernels); plus each other chip once; plus a mask with FULL tiles only (no mask
ring). The slow sweep: every chip x head dim x mask, forward alone and fwd+bwd.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.block_sparse import (CausalMask, ChunkedCausalMask, FullMask, LocalMask,
                                         PrefixLMMask, block_sparse_attention, build_block_map,
                                         random_block_mask)
from pallas_kernels.common import config as config_lib

from helpers.kernels import export_for_chip, kernel_calls

HEAD_DIMS = sorted(config_lib.TABLES["h100"])  # 64, 128, 256.
T, S, H = 1000, 1100, 4
MASKS = {
    "causal_local": CausalMask() & LocalMask(600, 0),
    "chunked_or_prefix": ChunkedCausalMask(384) | PrefixLMMask(100),
    "full": FullMask(),
    "per_head_blocks": random_block_mask(0, q_len=T, kv_len=S, block_size=128, density=0.4,
                                         num_heads=H),
}


def export(chip: str, head_dim: int, mask_name: str, *, segments: bool, backward: bool,
           kv_heads: int = 2):
  """Exports block-sparse attention (and its VJP) for chip's platform."""
  cfg = config_lib.default_config(chip)
  block_map = build_block_map(MASKS[mask_name], q_len=T, kv_len=S, num_q_heads=H,
                              num_kv_heads=kv_heads, head_dim=head_dim, config=cfg)
  sd = jax.ShapeDtypeStruct
  args = [sd((2, T, H, head_dim), jnp.bfloat16), sd((2, S, kv_heads, head_dim), jnp.bfloat16),
          sd((2, S, kv_heads, head_dim), jnp.bfloat16)]
  if segments:
    args += [sd((2, T), jnp.int32), sd((2, S), jnp.int32)]

  def attend(q, k, v, q_ids=None, kv_ids=None):
    return block_sparse_attention(q, k, v, block_map, q_segment_ids=q_ids,
                                  kv_segment_ids=kv_ids, config=cfg)
  return export_for_chip(chip, attend, args, backward=backward)


DEFAULT = ([(chip, d, "causal_local", seg) for chip in ("h100", "tpu_v5e") for d in HEAD_DIMS
            for seg in (False, True)]
           + [(chip, 128, "per_head_blocks", True) for chip in config_lib.CHIPS
              if chip not in ("h100", "tpu_v5e")]
           + [(chip, 128, "full", False) for chip in ("h100", "tpu_v5e")])


@pytest.mark.parametrize("chip, head_dim, mask_name, segments", DEFAULT)
def test_lowers(chip, head_dim, mask_name, segments):
  assert kernel_calls(export(chip, head_dim, mask_name, segments=segments,
                              backward=True)) == 3


@pytest.mark.slow
@pytest.mark.parametrize("chip, head_dim, mask_name", list(itertools.product(
    config_lib.CHIPS, HEAD_DIMS, MASKS)))
def test_lowers_sweep(chip, head_dim, mask_name):
  for segments in (False, True):
    export(chip, head_dim, mask_name, segments=segments, backward=False)
    export(chip, head_dim, mask_name, segments=segments, backward=True, kv_heads=1)


def test_block_map_arrays_are_kernel_sized():
  """The shipped GPU map keeps PARTIAL tiles few (deduplicated) for structured masks."""
  cfg = config_lib.default_config("h100")
  bm = build_block_map(CausalMask(), q_len=8192, kv_len=8192, num_q_heads=16, head_dim=128,
                       config=cfg)
  for kmap in (bm.fwd, bm.dq, bm.dkv):
    assert kmap.partial_masks.shape[0] <= 2  # The diagonal tile (and its GQA twin).
    assert kmap.index.shape[0] == 1  # One pattern for every head.
  assert 0.49 < bm.density("fwd") < 0.53
  assert bm.visible_pairs == 16 * 8192 * 8193 // 2
