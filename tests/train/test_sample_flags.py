"""`python -m train.sample` refuses out-of-range sampling flags, naming the flag."""

import pytest
from absl import flags
from absl.testing import flagsaver

from train import sample  # pylint: disable=unused-import  (defines the flags)


def _parse(*extra: str) -> None:
  with flagsaver.flagsaver():
    try:
      flags.FLAGS(["sample", "--workdir=/tmp/run", "--prompt=1+2=", *extra])
    finally:
      flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("bad, rule", [
    ("--temperature=-1", "must be >= 0"), ("--top_p=0", r"must be in \(0, 1\]"),
    ("--top_p=1.5", r"must be in \(0, 1\]"), ("--top_k=-1", "must be >= 0"),
    ("--max_new_tokens=0", "must be >= 1")])
def test_bad_sampling_flags_are_errors_naming_the_flag(bad, rule):
  name = bad.split("=")[0]
  with pytest.raises(flags.IllegalFlagValueError, match=f"flag {name}=.*{rule}"):
    _parse(bad)


def test_edge_values_and_unset_flags_are_accepted():
  _parse("--temperature=0", "--top_p=1", "--top_k=0", "--max_new_tokens=1")
  _parse()  # Unset: the run's config.sample decides.
