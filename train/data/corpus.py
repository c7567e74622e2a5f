"""The embedded corpus: procedurally generated text a tiny model learns fast.

No downloaded text: every document is a pure function of (split, index). A
document is a few lines, each either an addition ("37+45=82") or a sentence
from a small grammar ("The red fox sees a small bird."). The additions make
samples scorable: `heldout_addition_prompts` draws operand pairs that occur in
no split of the corpus (neither order, a+b nor b+a), and `score_additions`
grades a model's completions of them.

  document('train', 0)                 # a few lines joined by '\\n'
  heldout_addition_prompts(2, seed=0)  # [('37+45=', '82'), ...]
"""

import functools
import hashlib
import random
import re
from collections.abc import Sequence

SPLITS = ("train", "validation")

# Documents have this many lines, uniformly.
MIN_LINES, MAX_LINES = 2, 6
# Probability that a line is an addition rather than a sentence.
ADDITION_PROB = 0.8
# Operand size: (number of digits, probability). 1-digit operands are 0..9,
# 2-digit operands 10..99.
OPERAND_DIGITS = ((1, 0.3), (2, 0.7))
# One unordered operand pair in this many is held out of every split.
HELDOUT_ONE_IN = 8

_DETERMINERS = ("the", "a")
_ADJECTIVES = ("red", "small", "big", "quick", "lazy", "old", "young", "green",
               "brown", "happy")
_NOUNS = ("fox", "bird", "cat", "dog", "horse", "mouse", "owl", "frog", "bear",
          "fish")
_TRANSITIVE = ("sees", "chases", "likes", "follows", "watches", "finds",
               "helps", "hears")
_INTRANSITIVE = ("sleeps", "runs", "sings", "waits", "hides", "plays")
_PLACES = ("in the tree", "by the river", "under the bridge", "on the hill",
           "near the house", "in the field")


def _operand_range(digits: int) -> range:
  return range(0, 10) if digits == 1 else range(10 ** (digits - 1), 10 ** digits)


def is_heldout_pair(a: int, b: int) -> bool:
  """Whether the unordered operand pair {a, b} is kept out of every split."""
  key = f"{min(a, b)}+{max(a, b)}".encode()
  return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") % HELDOUT_ONE_IN == 0


@functools.cache
def _pairs(heldout: bool) -> dict[tuple[int, int], tuple[tuple[int, int], ...]]:
  """(digits of a, digits of b) -> the ordered pairs (a, b) on one side."""
  table = {}
  for da, _ in OPERAND_DIGITS:
    for db, _ in OPERAND_DIGITS:
      table[da, db] = tuple(
          (a, b) for a in _operand_range(da) for b in _operand_range(db)
          if is_heldout_pair(a, b) == heldout)
  return table


def _draw_pair(rng: random.Random, heldout: bool) -> tuple[int, int]:
  digits, weights = zip(*OPERAND_DIGITS)
  da, db = rng.choices(digits, weights, k=2)
  return rng.choice(_pairs(heldout)[da, db])


def _noun_phrase(rng: random.Random, determiner: str) -> str:
  words = [rng.choice(_ADJECTIVES)] if rng.random() < 0.6 else []
  words.append(rng.choice(_NOUNS))
  if determiner == "a" and words[0][0] in "aeiou":
    determiner = "an"
  return " ".join([determiner] + words)


def _sentence(rng: random.Random) -> str:
  subject = _noun_phrase(rng, rng.choice(_DETERMINERS))
  if rng.random() < 0.7:
    rest = f"{rng.choice(_TRANSITIVE)} {_noun_phrase(rng, rng.choice(_DETERMINERS))}"
  else:
    rest = f"{rng.choice(_INTRANSITIVE)} {rng.choice(_PLACES)}"
  return f"{subject[0].upper()}{subject[1:]} {rest}."


def _addition(rng: random.Random) -> str:
  a, b = _draw_pair(rng, heldout=False)
  return f"{a}+{b}={a + b}"


def document(split: str, index: int) -> str:
  """The `index`-th document of `split` (one of SPLITS): lines joined by '\\n'."""
  if split not in SPLITS:
    raise ValueError(f"Unknown corpus split {split!r}; expected one of {SPLITS}.")
  rng = random.Random(f"treadle_corpus/{split}/{index}")
  lines = []
  for _ in range(rng.randint(MIN_LINES, MAX_LINES)):
    lines.append(_addition(rng) if rng.random() < ADDITION_PROB else _sentence(rng))
  return "\n".join(lines)


def heldout_addition_prompts(num: int, seed: int) -> list[tuple[str, str]]:
  """`num` distinct (prompt, answer) pairs such as ('37+45=', '82').

  Operands follow the corpus' size distribution but come only from held-out
  pairs, which no split contains in either order.
  """
  available = sum(len(p) for p in _pairs(True).values())
  if not 0 <= num <= available:
    raise ValueError(f"num must be in [0, {available}], got {num}.")
  rng = random.Random(f"treadle_corpus/heldout/{seed}")
  seen, out = set(), []
  while len(out) < num:
    a, b = _draw_pair(rng, heldout=True)
    if (a, b) not in seen:
      seen.add((a, b))
      out.append((f"{a}+{b}=", str(a + b)))
  return out


def score_additions(prompts_answers: Sequence[tuple[str, str]],
                    completions: Sequence[str]) -> float:
  """Share of completions that start with the answer, then a non-digit or end.

  Args:
    prompts_answers: (prompt, answer) pairs from `heldout_addition_prompts`.
    completions: the generated text after each prompt (prompt excluded).
  Returns:
    A float in [0, 1]; 0 for no prompts.
  """
  if len(prompts_answers) != len(completions):
    raise ValueError(f"{len(prompts_answers)} prompts but {len(completions)} completions.")
  if not completions:
    return 0.0
  right = 0
  for (_, answer), completion in zip(prompts_answers, completions):
    rest = completion[len(answer):]
    right += completion.startswith(answer) and not rest[:1].isdigit()
  return right / len(completions)


def _alternatives(words: Sequence[str]) -> str:
  return "(?:" + "|".join(re.escape(w) for w in words) + ")"


@functools.cache
def _sentence_pattern() -> re.Pattern:
  """The grammar of `_sentence` as one regular expression (articles agree)."""
  noun_phrase = (f"(?:(?:[Tt]he|[Aa]) (?:{_alternatives(_ADJECTIVES)} )?"
                 f"{_alternatives(_NOUNS)})")
  predicate = (f"(?:{_alternatives(_TRANSITIVE)} {noun_phrase}"
               f"|{_alternatives(_INTRANSITIVE)} {_alternatives(_PLACES)})")
  return re.compile(f"{noun_phrase} {predicate}\\.")


def _article_agrees(sentence: str) -> bool:
  """'a' before consonant-initial words only, 'an' before vowel-initial ones."""
  words = sentence.split()
  for article, following in zip(words, words[1:]):
    if article.lower() == "a" and following[0] in "aeiou":
      return False
    if article.lower() == "an" and following[0] not in "aeiou":
      return False
  return True


def is_grammatical(sentence: str) -> bool:
  """Whether `sentence` is one the corpus grammar can produce ('The red fox sleeps ...')."""
  normalised = re.sub(r"\b([Aa])n\b", r"\1", sentence)
  return (sentence[:1].isupper() and _article_agrees(sentence)
          and _sentence_pattern().fullmatch(normalised) is not None)


def sentence_prompts(num: int, seed: int) -> list[str]:
  """`num` sentence openings (a grammatical subject and a space) for the model to finish."""
  rng = random.Random(f"treadle_corpus/sentence_prompts/{seed}")
  prompts = []
  for _ in range(num):
    subject = _noun_phrase(rng, rng.choice(_DETERMINERS))
    prompts.append(f"{subject[0].upper()}{subject[1:]} ")
  return prompts


def score_sentences(prompts: Sequence[str], completions: Sequence[str]) -> float:
  """Share of prompts whose completed first line is a grammatical sentence."""
  if len(prompts) != len(completions):
    raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions.")
  if not prompts:
    return 0.0
  lines = [(prompt + completion).split("\n")[0] for prompt, completion in zip(prompts, completions)]
  return sum(is_grammatical(line) for line in lines) / len(lines)
