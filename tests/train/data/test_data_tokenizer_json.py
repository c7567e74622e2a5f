"""Hugging Face tokenizer.json files (read with the `tokenizers` library), built locally."""

import json
import pickle

import pytest

from train.data import corpus
from train.data import tokenizers

hf_tokenizers = pytest.importorskip("tokenizers")


def _build(directory, special_tokens) -> str:
  """A small byte-level BPE tokenizer.json trained on the embedded corpus, in `directory`."""
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=special_tokens, show_progress=False,
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([corpus.document("train", i) for i in range(200)], trainer)
  path = directory / "tokenizer.json"
  tok.save(str(path))
  return str(path)


def test_llama3_style_round_trip(tmp_path):
  _build(tmp_path, ["<|begin_of_text|>", "<|end_of_text|>", "<pad>"])
  tok = tokenizers.get_tokenizer(str(tmp_path))  # The model directory stands for its file.
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
  assert tok.vocab_size == 400
  text = "The red fox sees a small bird. 12+34=46 é✓"
  ids = tok.encode(text)
  assert len(ids) < len(text.encode()) and tok.bos_id not in ids
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id] + ids) == text
  assert tok.decode([tok.pad_id] + ids + [tok.eos_id] + ids, stop_at_eos=False) == text + text
  clone = pickle.loads(pickle.dumps(tok))  # grain workers pickle it.
  assert clone.encode(text) == ids


def test_special_tokens_from_tokenizer_config(tmp_path):
  path = _build(tmp_path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  with open(tmp_path / "tokenizer_config.json", "w") as f:  # Qwen: no bos, chat eos.
    json.dump({"bos_token": None, "eos_token": {"content": "<|im_end|>"},
               "pad_token": "<|endoftext|>"}, f)
  tok = tokenizers.get_tokenizer(path)
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 2, 0)


def test_tokenizer_json_errors_name_the_field(tmp_path):
  _build(tmp_path, ["<unk>"])
  with pytest.raises(ValueError, match="config.data.tokenizer.*eos"):
    tokenizers.get_tokenizer(str(tmp_path / "tokenizer.json"))
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.data.tokenizer"):
    tokenizers.get_tokenizer(str(tmp_path / "junk"))
  with pytest.raises(FileNotFoundError, match="config.data.tokenizer"):
    tokenizers.get_tokenizer(str(tmp_path / "junk" / "missing.json"))
