"""`python -m train.sample` refuses out-of-range sampling flags, naming the flag."""

import pytest
from absl import flags
from absl.testing import flagsaver

from train import sample  # pylint: disable=unused-import  (defines the flags)


def _set(**values) -> None:
  """Sets flags as parsing would, running their validators; restores them after."""
  with flagsaver.flagsaver():
    for name, value in values.items():
      setattr(flags.FLAGS, name, value)


@pytest.mark.parametrize("name, bad, rule", [
    ("temperature", -1.0, "must be >= 0"), ("top_p", 0.0, r"must be in \(0, 1\]"),
    ("top_p", 1.5, r"must be in \(0, 1\]"), ("top_k", -1, "must be >= 0"),
    ("max_new_tokens", 0, "must be >= 1")])
def test_bad_sampling_flags_are_errors_naming_the_flag(name, bad, rule):
  with pytest.raises(flags.IllegalFlagValueError, match=f"flag --{name}=.*{rule}"):
    _set(**{name: bad})
  assert flags.FLAGS[name].value is None  # Unchanged for whatever runs next.


def test_edge_values_and_unset_flags_are_accepted():
  _set(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=1)
  _set(temperature=None, top_p=None, top_k=None, max_new_tokens=None)  # The run's config.sample.
