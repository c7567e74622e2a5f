"""Every shipped flash-attention configuration lowers for its platform, from CPU.

`jax.export` for platforms=['cuda'] runs the Mosaic GPU lowering (which also
checks shared memory against Hopper's 227 KiB); for ['tpu'] it runs the Pallas
TPU lowering inside an abstract mesh whose AbstractDevice names the chip (some
TPU lowering rules ask for the device kind). Compilation to PTX / TPU binaries
happens on hardware and is not covered here.

Default set: every (platform table, head dim) entry with all features on and
with none (forward+backward, which holds all three kernels), plus each other
chip once. The slow sweep covers every chip x head dim x single feature,
forward alone and forward+backward.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.common import config as config_lib
from pallas_kernels.flash_attention import flash_attention

from helpers.kernels import export_for_chip, kernel_calls

HEAD_DIMS = sorted(config_lib.TABLES["h100"])  # Table keys: 64, 128, 256.
FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "segments": dict(segments=True),
    "window": dict(local_window_size=(256, 128)),
    "gqa4": dict(kv_heads=1),
    "all": dict(causal=True, segments=True, local_window_size=(512, 0), kv_heads=1),
}


def export(chip: str, head_dim: int, feature: str, backward: bool):
  """Exports flash attention (and its VJP) for chip's platform; returns the Exported."""
  cfg = config_lib.default_config(chip)
  opts = dict(FEATURES[feature])
  segments, kv_heads = opts.pop("segments", False), opts.pop("kv_heads", 4)
  b, t, s, h = 2, 1000, 1100, 4
  sd = jax.ShapeDtypeStruct
  args = [sd((b, t, h, head_dim), jnp.bfloat16), sd((b, s, kv_heads, head_dim), jnp.bfloat16),
          sd((b, s, kv_heads, head_dim), jnp.bfloat16)]
  if segments:
    args += [sd((b, t), jnp.int32), sd((b, s), jnp.int32)]

  def attend(q, k, v, q_ids=None, kv_ids=None):
    return flash_attention(q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids, config=cfg,
                           **opts)
  return export_for_chip(chip, attend, args, backward=backward)


# Forward+backward exports contain the forward kernel too.
DEFAULT = ([(chip, d, f) for chip in ("h100", "tpu_v5e") for d in HEAD_DIMS
            for f in ("plain", "all")]
           + [(chip, 128, "all") for chip in config_lib.CHIPS
              if chip not in ("h100", "tpu_v5e")])


@pytest.mark.parametrize("chip, head_dim, feature", DEFAULT)
def test_lowers(chip, head_dim, feature):
  assert kernel_calls(export(chip, head_dim, feature, backward=True)) == 3


@pytest.mark.slow
@pytest.mark.parametrize("chip, head_dim, feature", list(itertools.product(
    config_lib.CHIPS, HEAD_DIMS, FEATURES)))
def test_lowers_sweep(chip, head_dim, feature):
  export(chip, head_dim, feature, backward=False)
  export(chip, head_dim, feature, backward=True)


def test_gpu_shared_memory_is_checked():
  """A ring too deep for 227 KiB fails at export, so the passes above mean something."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(config_lib.default_config("h100"), max_concurrent_steps=8)
  sd = jax.ShapeDtypeStruct
  q = sd((1, 1024, 2, 256), jnp.bfloat16)
  fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, config=cfg))
  with pytest.raises(ValueError, match="shared memory"):
    jax.export.export(fn, platforms=["cuda"])(q, q, q)
