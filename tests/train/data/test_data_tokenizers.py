"""Tokenizers: byte and SentencePiece round trips, specials, errors."""

import pickle

import pytest
import sentencepiece

from train.data import corpus
from train.data import tokenizers


def test_byte_round_trip_and_specials():
  tok = tokenizers.get_tokenizer("byte")
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
  text = "37+45=82\nThe red fox sees a small bird. é✓"
  ids = tok.encode(text)
  assert ids[:3] == [ord("3") + 3, ord("7") + 3, ord("+") + 3]
  assert all(3 <= i < 259 for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id] + tok.encode("x")) == text
  assert tok.decode(ids + [tok.eos_id] + tok.encode("x"), stop_at_eos=False) == text + "x"
  assert tok.decode([tok.pad_id, *tok.encode("ab"), tok.pad_id]) == "ab"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  path = tmp_path_factory.mktemp("sp") / "tiny.model"
  with open(path, "wb") as f:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([corpus.document("train", i) for i in range(300)]),
        model_writer=f, vocab_size=96, model_type="unigram",
        pad_id=3, bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
  return str(path)


def test_sentencepiece_round_trip(sp_model):
  tok = tokenizers.get_tokenizer(sp_model)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (3, 1, 2, 96)
  text = "The red fox sees a small bird. 12+34=46"
  ids = tok.encode(text)
  assert len(ids) < len(text)
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id] + ids) == text
  assert tok.decode([tok.pad_id] + ids) == text
  clone = pickle.loads(pickle.dumps(tok))  # grain workers pickle it.
  assert clone.encode(text) == ids


def test_bad_tokenizer_names_the_field(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.tokenizer"):
    tokenizers.get_tokenizer(str(tmp_path / "missing.model"))
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="config.data.tokenizer"):
    tokenizers.get_tokenizer(str(junk))
