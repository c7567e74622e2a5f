"""Writes the traced programs (jaxprs) of every Pallas kernel family on the hardware path.

    python tests/pallas_kernels/jaxpr_snapshot.py OUT_DIR [--only SUBSTRING]

For each case (kernel family x chip x head dim x features, with and without
segment ids; for SSD and WKV-7 also the GPU kernel, Mosaic GPU or Triton, and dtype) it writes OUT_DIR/<case>.fwd.txt, the str() of `jax.make_jaxpr` of
the forward, and OUT_DIR/<case>.vjp.txt, of the forward and its VJP in q, k, v.
Kernels run with interpret=False: these are the programs Mosaic GPU and Mosaic
TPU compile. make_jaxpr only traces, so this runs on a CPU host (inside an
abstract mesh naming the chip, as tests/helpers/kernels.py's export_for_chip).

Shape legend: layers/__init__.py (b, t, s, h, k, d; B block length; ns
selected blocks per query).

A refactor of pallas_kernels/ that must not change what the kernels compute
is checked by snapshotting both trees and diffing (nothing is checked in):

    git stash  # or: git worktree add /tmp/old <base commit>; run from there
    python tests/pallas_kernels/jaxpr_snapshot.py /tmp/jaxpr_before
    git stash pop
    python tests/pallas_kernels/jaxpr_snapshot.py /tmp/jaxpr_after
    diff -r /tmp/jaxpr_before /tmp/jaxpr_after   # no output: byte-identical

The old tree needs its own copy of this script when the public import paths
moved. tests/pallas_kernels/test_jaxpr_snapshot.py traces one case per kernel
family and platform to keep this tool working.
"""

import argparse
import os
import pathlib
import sys

_REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_REPO))  # This tree's packages, also when run as a script.

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh  # noqa: E402  pylint: disable=wrong-import-position

from pallas_kernels.block_sparse import (  # noqa: E402  pylint: disable=wrong-import-position
    CausalMask, ChunkedCausalMask, FullMask, LocalMask, PrefixLMMask, block_sparse_attention,
    build_block_map, random_block_mask)
from pallas_kernels.common import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position
from pallas_kernels.flash_attention import flash_attention  # noqa: E402  pylint: disable=wrong-import-position
from pallas_kernels.nsa_selection import selected_block_attention  # noqa: E402  pylint: disable=wrong-import-position
from pallas_kernels.ssd import SsdConfig, ssd  # noqa: E402  pylint: disable=wrong-import-position
from pallas_kernels.wkv7 import Wkv7Config, wkv7_pallas  # noqa: E402  pylint: disable=wrong-import-position

_SD = jax.ShapeDtypeStruct
HEAD_DIMS = (64, 128, 256)  # The keys of the chip tables.
MAIN_CHIPS = ("h100", "tpu_v5e")  # Every head dim and feature.
OTHER_CHIPS = ("h200", "tpu_v4", "tpu_v5p", "tpu_v6e")  # One case each.


def _qkv(b, t, s, h, kh, d, segments: bool):
  args = [_SD((b, t, h, d), jnp.bfloat16), _SD((b, s, kh, d), jnp.bfloat16),
          _SD((b, s, kh, d), jnp.bfloat16)]
  if segments:
    args += [_SD((b, t), jnp.int32), _SD((b, s), jnp.int32)]
  return args


FLASH_FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "segments": dict(segments=True),
    "window": dict(local_window_size=(256, 128)),
    "gqa4": dict(kv_heads=1),
    "all": dict(causal=True, segments=True, local_window_size=(512, 0), kv_heads=1),
}


def _flash(chip: str, d: int, feature: str):
  cfg = config_lib.default_config(chip)
  opts = dict(FLASH_FEATURES[feature])
  segments, kv_heads = opts.pop("segments", False), opts.pop("kv_heads", 4)

  def attend(q, k, v, q_ids=None, kv_ids=None):
    return flash_attention(q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids, config=cfg,
                           **opts)
  return attend, _qkv(2, 1000, 1100, 4, kv_heads, d, segments)


_T, _S, _H = 1000, 1100, 4
SPARSE_MASKS = {
    "causal_local": CausalMask() & LocalMask(600, 0),
    "chunked_or_prefix": ChunkedCausalMask(384) | PrefixLMMask(100),
    "full": FullMask(),
    "per_head_blocks": random_block_mask(0, q_len=_T, kv_len=_S, block_size=128, density=0.4,
                                         num_heads=_H),
}


def _sparse(chip: str, d: int, mask: str, segments: bool, kv_heads: int):
  cfg = config_lib.default_config(chip)
  block_map = build_block_map(SPARSE_MASKS[mask], q_len=_T, kv_len=_S, num_q_heads=_H,
                              num_kv_heads=kv_heads, head_dim=d, config=cfg)

  def attend(q, k, v, q_ids=None, kv_ids=None):
    return block_sparse_attention(q, k, v, block_map, q_segment_ids=q_ids,
                                  kv_segment_ids=kv_ids, config=cfg)
  return attend, _qkv(2, _T, _S, _H, kv_heads, d, segments)


def _nsa(chip: str, d: int, group: int, segments: bool, b: int = 1, t: int = 1000):
  """Selection over ns = 16 blocks of B = 64; b=4, t=4096 runs TPU query chunks."""
  cfg = config_lib.default_config(chip)
  kv_heads, ns, block = 2, 16, 64
  args = [_SD((b, t, kv_heads * group, d), jnp.bfloat16), _SD((b, t, kv_heads, d), jnp.bfloat16),
          _SD((b, t, kv_heads, d), jnp.bfloat16), _SD((b, t, kv_heads, ns), jnp.int32)]
  if segments:
    args.append(_SD((b, t), jnp.int32))

  def attend(q, k, v, idx, ids=None):
    return selected_block_attention(q, k, v, idx, block_size=block, q_segment_ids=ids,
                                    kv_segment_ids=ids, config=cfg)
  return attend, args


def _ssd(chip: str, gpu_kernel: str, d: int, n: int, chunk: int, dtype):
  """Mamba-2's SSD: x [b, t, h, d], dt, a, B, C [b, t, ng, N], D; packed documents."""
  b, t, h, ng = 2, 300, 4, 2
  config = SsdConfig(chip, gpu_kernel=gpu_kernel)
  args = [_SD((b, t, h, d), dtype), _SD((b, t, h), jnp.float32), _SD((h,), jnp.float32),
          _SD((b, t, ng, n), dtype), _SD((b, t, ng, n), dtype), _SD((h,), jnp.float32),
          _SD((b, t), jnp.int32)]

  def scan(x, dt, a, bmat, cmat, d_skip, ids):
    return ssd(x, dt, a, bmat, cmat, d_skip, chunk_size=chunk, segment_ids=ids,
               config=config)[0]
  return scan, args


def _wkv7(chip: str, gpu_kernel: str, d: int, chunk: int, dtype):
  """RWKV-7's WKV: r, w, k, v, a, b [b, t, h, d] and a document index."""
  b, t, h = 2, 150, 2
  config = Wkv7Config(chip, chunk, gpu_kernel=gpu_kernel)
  args = [_SD((b, t, h, d), dtype) for _ in range(6)] + [_SD((b, t), jnp.int32)]

  def scan(r, w, k, v, a, bb, doc):
    return wkv7_pallas(r, w, k, v, a, bb, doc=doc, config=config)[0]
  return scan, args


RECURRENCE_KERNELS = (("h100", "mosaic"), ("h100", "triton"), ("tpu_v5e", "mosaic"))


def cases():
  """{name: thunk -> (attend(q, k, v, *rest), [q, k, v, *rest] ShapeDtypeStructs)}.

  The recurrences (ssd, wkv7) follow the same form: their VJP is taken in the
  first three inputs, which traces the whole backward kernel.
  """
  out = {}
  for chip in MAIN_CHIPS:
    for d in HEAD_DIMS:
      for feature in FLASH_FEATURES:
        out[f"flash__{chip}__d{d}__{feature}"] = (chip, lambda c=chip, d=d, f=feature: _flash(
            c, d, f))
      for mask in SPARSE_MASKS:
        for seg in (False, True):
          out[f"sparse__{chip}__d{d}__{mask}__seg{int(seg)}"] = (
              chip, lambda c=chip, d=d, m=mask, s=seg: _sparse(c, d, m, s, kv_heads=2))
      out[f"sparse__{chip}__d{d}__causal_local__mqa"] = (
          chip, lambda c=chip, d=d: _sparse(c, d, "causal_local", True, kv_heads=1))
    for d, group, seg in ((64, 1, False), (128, 16, True), (128, 16, False), (256, 64, True)):
      out[f"nsa__{chip}__d{d}__g{group}__seg{int(seg)}"] = (
          chip, lambda c=chip, d=d, g=group, s=seg: _nsa(c, d, g, s))
    out[f"nsa__{chip}__d128__g8__seg1__chunks"] = (
        chip, lambda c=chip: _nsa(c, 128, 8, True, b=4, t=4096))
  for chip in OTHER_CHIPS:
    out[f"flash__{chip}__d128__all"] = (chip, lambda c=chip: _flash(c, 128, "all"))
    out[f"sparse__{chip}__d128__per_head_blocks__seg1"] = (
        chip, lambda c=chip: _sparse(c, 128, "per_head_blocks", True, kv_heads=2))
    out[f"nsa__{chip}__d128__g8__seg0"] = (chip, lambda c=chip: _nsa(c, 128, 8, False))
  for chip, kernel in RECURRENCE_KERNELS:
    for dtype in (jnp.float32, jnp.bfloat16):
      name = jnp.dtype(dtype).name
      for d, n, chunk in ((32, 32, 64), (64, 128, 256)):  # tiny, published Mamba-2
        out[f"ssd__{chip}__{kernel}__d{d}__n{n}__c{chunk}__{name}"] = (
            chip, lambda c=chip, g=kernel, d=d, n=n, ch=chunk, dt=dtype: _ssd(c, g, d, n, ch, dt))
      for d, chunk in ((32, 16), (64, 16), (64, 64)):
        out[f"wkv7__{chip}__{kernel}__d{d}__c{chunk}__{name}"] = (
            chip, lambda c=chip, g=kernel, d=d, ch=chunk, dt=dtype: _wkv7(c, g, d, ch, dt))
  return out


def _chip_mesh(chip: str):
  cfg = config_lib.default_config(chip)
  platform = "cuda" if cfg.platform == "gpu" else "tpu"
  return use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
      device_kind=cfg.device_kind, num_cores=1, platform=platform)))


def trace(chip: str, attend, args):
  """(forward jaxpr text, forward + VJP jaxpr text) of attend on args."""
  def fwd(q, k, v, *rest):
    return attend(q, k, v, *rest)

  def vjp(q, k, v, *rest):
    out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, *rest), q, k, v)
    return out, pullback(out)

  with _chip_mesh(chip):
    return str(jax.make_jaxpr(fwd)(*args)), str(jax.make_jaxpr(vjp)(*args))


def write(out_dir, only: str = "") -> int:
  """Writes every case whose name contains `only`; returns the number of files."""
  os.makedirs(out_dir, exist_ok=True)
  written = 0
  for name, (chip, build) in cases().items():
    if only not in name:
      continue
    fwd_text, vjp_text = trace(chip, *build())
    for kind, text in (("fwd", fwd_text), ("vjp", vjp_text)):
      with open(os.path.join(out_dir, f"{name}.{kind}.txt"), "w") as f:
        f.write(text)
      written += 1
  return written


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("out_dir")
  parser.add_argument("--only", default="", help="only cases whose name contains this")
  args = parser.parse_args(argv)
  print(f"{write(args.out_dir, args.only)} jaxprs written to {args.out_dir}")


if __name__ == "__main__":
  main()
