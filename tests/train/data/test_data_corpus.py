"""The embedded corpus: determinism, held-out additions, scoring."""

import re

import pytest

from train.data import corpus

_ADDITION = re.compile(r"^(\d+)\+(\d+)=(\d+)$")


def _additions(split, num):
  """(a, b, c) for every addition line of the first `num` documents."""
  out = []
  for i in range(num):
    for line in corpus.document(split, i).split("\n"):
      m = _ADDITION.match(line)
      if m:
        out.append(tuple(int(g) for g in m.groups()))
  return out


def test_documents_are_deterministic_and_varied():
  first = [corpus.document("train", i) for i in range(50)]
  assert first == [corpus.document("train", i) for i in range(50)]
  assert len(set(first)) == 50
  assert corpus.document("validation", 3) != corpus.document("train", 3)
  text = "\n".join(first)
  assert any(_ADDITION.match(line) for line in text.split("\n"))
  assert re.search(r"^(The|A|An) [a-z ]+\.$", text, re.M)
  with pytest.raises(ValueError, match="split"):
    corpus.document("test", 0)


def test_additions_are_right_and_never_held_out():
  seen = set()
  for split, num in (("train", 20_000), ("validation", 2_000)):
    for a, b, c in _additions(split, num):
      assert a + b == c
      assert not corpus.is_heldout_pair(a, b)
      seen.add((a, b))
  assert len(seen) > 5_000  # Most train pairs do occur.
  prompts = corpus.heldout_addition_prompts(200, seed=0)
  assert len(set(prompts)) == 200
  for prompt, answer in prompts:
    a, b = (int(x) for x in prompt.rstrip("=").split("+"))
    assert int(answer) == a + b
    assert (a, b) not in seen and (b, a) not in seen
  assert prompts == corpus.heldout_addition_prompts(200, seed=0)
  assert prompts != corpus.heldout_addition_prompts(200, seed=1)


def test_score_additions():
  pa = [("37+45=", "82"), ("5+6=", "11"), ("9+9=", "18"), ("1+2=", "3")]
  completions = ["82\nThe fox.", "11", "181", "4"]
  assert corpus.score_additions(pa, completions) == 0.5
  assert corpus.score_additions(pa, ["82", "11", "18", "3 "]) == 1.0
  assert corpus.score_additions([], []) == 0.0
  with pytest.raises(ValueError):
    corpus.score_additions(pa, completions[:2])


def test_every_corpus_sentence_is_grammatical_and_broken_ones_are_not():
  lines = [line for i in range(200) for line in corpus.document("validation", i).split("\n")]
  sentences = [line for line in lines if "+" not in line]
  assert sentences and all(corpus.is_grammatical(s) for s in sentences)
  for broken in ("The fox sees.", "An red fox sleeps in the tree.", "A owl hides on the hill.",
                 "the fox runs by the river.", "The fox runs by the river",
                 "The fox chases the fox the fox."):
    assert not corpus.is_grammatical(broken), broken


def test_sentence_prompts_and_scoring():
  prompts = corpus.sentence_prompts(20, seed=3)
  assert prompts == corpus.sentence_prompts(20, seed=3) and len(set(prompts)) > 5
  assert all(p.endswith(" ") and p[0].isupper() for p in prompts)
  finished = ["sleeps in the tree.\n1+2=3", "sleeps."]
  assert corpus.score_sentences(["The fox ", "The cat "], finished) == 0.5
