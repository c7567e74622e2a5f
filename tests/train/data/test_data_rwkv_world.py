"""The RWKV World tokenizer against the `rwkv` package's TRIE_TOKENIZER (same vocabulary file)."""

import pickle

import pytest

from train.data import corpus
from train.data import rwkv_world
from train.data import tokenizers

rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")

TEXTS = [
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "\n\n\tdef f(x):\n        return x ** 2  # squares\n\n\n",
    "Ünïcödé: naïve café, Straße, 北京欢迎你, こんにちは世界, 안녕하세요, Привет мир, مرحبا",
    "Emoji 🤖🚀👍🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 and math ∑∫√∞ ≠ ≤ ≥",
    "################################################################################ end",
    " " * 300 + "x" + "-" * 81,
    "\x00\x01 control \x7f bytes \u200b zero-width \ufeff bom",
]


@pytest.fixture(scope="module")
def vocab_path():
  return rwkv_world.find_vocab_file()


@pytest.fixture(scope="module")
def reference(vocab_path):
  return rwkv_tokenizer.TRIE_TOKENIZER(vocab_path)


@pytest.fixture(scope="module")
def tok(vocab_path):
  return tokenizers.get_tokenizer(vocab_path)


def test_encode_and_decode_match_the_rwkv_package(tok, reference):
  texts = TEXTS + [corpus.document("train", i) for i in range(5)]
  for text in texts:
    ids = tok.encode(text)
    assert ids == reference.encode(text), text
    assert tok.decode(ids) == reference.decode(ids) == text
  assert len(tok.encode(TEXTS[1])) < len(TEXTS[1]) / 2  # Whole words, not bytes.


def test_specials_vocab_and_invalid_utf8(tok):
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 0)
  assert tok.vocab_size == 65_530  # <= the 65,536 rows of configs/rwkv.py's sizes.
  hello = tok.encode("hello")
  assert tok.decode(hello + [0] + hello) == "hello"
  assert tok.decode(hello + [0] + hello, stop_at_eos=False) == "hellohello"
  assert tok.encode_bytes(b"\xff\xfe") == [256, 255]  # Lone bytes are their own tokens.
  assert tok.decode([256]) == "\ufffd"


def test_selected_by_name_and_pickles(tok, vocab_path):
  assert tokenizers.get_tokenizer("rwkv_world").path == vocab_path
  back = pickle.loads(pickle.dumps(tok))
  assert back.encode(TEXTS[3]) == tok.encode(TEXTS[3])
  assert len(pickle.dumps(tok)) < 1000  # The path, not the table.


def test_missing_or_malformed_file_names_the_field(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match=r"data.tokenizer=.*no such RWKV World.*rwkv. pip package"):
    tokenizers.get_tokenizer(str(tmp_path / "rwkv_vocab_v20230424.txt"))
  bad = tmp_path / "vocab.txt"
  bad.write_text("1 'a' 2\n")
  with pytest.raises(ValueError, match=r"data.tokenizer=.*line 1"):
    tokenizers.get_tokenizer(str(bad))
  monkeypatch.setattr(rwkv_world.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"data.tokenizer='rwkv_world'.*path"):
    tokenizers.get_tokenizer("rwkv_world")
