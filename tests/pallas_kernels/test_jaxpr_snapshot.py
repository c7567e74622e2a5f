"""The jaxpr snapshot tool (jaxpr_snapshot.py) traces every kernel family on both platforms.

One case per (family, platform): the files hold the hardware kernels (forward
alone: one; forward + VJP: forward, dq and dk/dv, or for SSD and WKV-7 the
forward and the reverse scan), and tracing again gives the
same text, which is what makes a before/after diff of a refactor meaningful.
"""

import pytest

import jaxpr_snapshot

# The kernel primitive in a traced program: Mosaic TPU pallas_call, Mosaic GPU mpmd_map.
_KERNEL = {"h100": "mpmd_map[", "tpu_v5e": "pallas_call["}
# name -> kernels in the forward alone, and in the forward + VJP (attention: forward, dq,
# dk/dv; the recurrences: forward and the reverse scan).
CASES = {**{f"{family}__{chip}__d128__{rest}": (1, 3) for chip in _KERNEL
            for family, rest in (("flash", "all"), ("sparse", "causal_local__seg1"),
                                 ("nsa", "g16__seg1"))},
         **{f"{family}__{chip}__mosaic__{rest}__bfloat16": (1, 2) for chip in _KERNEL
            for family, rest in (("ssd", "d64__n128__c256"), ("wkv7", "d64__c16"))}}


@pytest.mark.parametrize("name", sorted(CASES))
def test_snapshot_holds_the_kernels_and_is_deterministic(name, tmp_path):
  assert jaxpr_snapshot.write(tmp_path, only=name) == 2
  fwd, vjp = ((tmp_path / f"{name}.{kind}.txt").read_text() for kind in ("fwd", "vjp"))
  kernel = _KERNEL[name.split("__")[1]]
  assert (fwd.count(kernel), vjp.count(kernel)) == CASES[name]
  chip, build = jaxpr_snapshot.cases()[name]
  assert jaxpr_snapshot.trace(chip, *build()) == (fwd, vjp)
