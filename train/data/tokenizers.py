"""Tokenizers: UTF-8 bytes (the default), a SentencePiece model, a Hugging Face
`tokenizer.json` (read by the `tokenizers` library), or the RWKV World vocabulary
(train/data/rwkv_world.py), all from local files.

All expose the same small interface: `encode(text) -> list[int]` without
special tokens (the pipeline adds bos/eos), `decode(ids) -> str` that drops
special tokens and by default stops at the first eos, and the ids `pad_id`,
`bos_id`, `eos_id` and `vocab_size`.
"""

import json
import os
from collections.abc import Iterable

import numpy as np
import sentencepiece

from train.data import rwkv_world
from train.data.rwkv_world import RwkvWorldTokenizer, find_vocab_file


class ByteTokenizer:
  """UTF-8 bytes shifted past three special tokens.

  Attributes:
    pad_id: 0. bos_id: 1. eos_id: 2. Byte b is token b + 3.
    vocab_size: 259.
  """

  pad_id = 0
  bos_id = 1
  eos_id = 2
  offset = 3
  vocab_size = 256 + offset

  def encode(self, text: str) -> list[int]:
    return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
            + self.offset).tolist()

  def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
    out = bytearray()
    for i in ids:
      i = int(i)
      if i == self.eos_id and stop_at_eos:
        break
      if self.offset <= i < self.vocab_size:
        out.append(i - self.offset)
    return out.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model file; needs bos and eos ids (pad falls back to 0).

  Attributes:
    path: the .model file.
    pad_id, bos_id, eos_id, vocab_size: read from the model.
  """

  def __init__(self, path: str):
    self.path = path
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f"SentencePiece model {path} (config.data.tokenizer) has no "
                       "bos or eos piece; train it with bos_id and eos_id >= 0.")
    # Padding is masked out of the loss, so any id works when the model has none.
    self.pad_id = max(self._sp.pad_id(), 0)
    self.vocab_size = self._sp.get_piece_size()

  def __getstate__(self):  # The C++ processor does not pickle; reload it.
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
    keep = []
    for i in ids:
      i = int(i)
      if i == self.eos_id and stop_at_eos:
        break
      if (0 <= i < self.vocab_size and i != self.pad_id
          and not self._sp.is_control(i)):
        keep.append(i)
    return self._sp.decode(keep)


# Special-token names tried, in order, when no tokenizer_config.json names them
# (Llama 3, Qwen, Mistral/Llama 2, Gemma, GPT-2 conventions).
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
_PAD_NAMES = ("<pad>", "<|finetune_right_pad_id|>", "<|pad|>")


def _token_name(entry) -> str | None:
  """A tokenizer_config.json special-token entry: a string, {'content': ...} or None."""
  if isinstance(entry, dict):
    return entry.get("content")
  return entry


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json` (Llama 3, Qwen, Mistral, Gemma ...), run by `tokenizers`.

  Special tokens come from a tokenizer_config.json beside the file when there is
  one (bos_token, eos_token, pad_token), else from the usual names
  (<|begin_of_text|>, <s>, <bos>; <|end_of_text|>, <|endoftext|>, </s>, <eos>).
  A tokenizer without a bos token (Qwen) starts documents with its eos token,
  which then separates packed documents as in its pre-training.

  Attributes:
    path: the tokenizer.json file.
    pad_id, bos_id, eos_id, vocab_size: read from the files.
  """

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    named = {}
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.isfile(config_path):
      with open(config_path) as f:
        config = json.load(f)
      named = {kind: _token_name(config.get(f"{kind}_token")) for kind in ("bos", "eos", "pad")}
    self.eos_id = self._find(named.get("eos"), _EOS_NAMES)
    if self.eos_id is None:
      raise ValueError(f"{path} (config.data.tokenizer) has no eos token: name it as eos_token "
                       "in a tokenizer_config.json beside it.")
    bos = self._find(named.get("bos"), _BOS_NAMES)
    self.bos_id = self.eos_id if bos is None else bos
    pad = self._find(named.get("pad"), _PAD_NAMES)
    # Padding is masked out of the loss, so any id works when there is none.
    self.pad_id = 0 if pad is None else pad
    self._special = {t.content for t in self._tok.get_added_tokens_decoder().values()
                     if t.special}

  def _find(self, name: str | None, fallbacks: tuple[str, ...]) -> int | None:
    for candidate in ((name,) if name else fallbacks):
      token_id = self._tok.token_to_id(candidate)
      if token_id is not None:
        return token_id
    return None

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
    keep = []
    for i in ids:
      i = int(i)
      if i == self.eos_id and stop_at_eos:
        break
      if 0 <= i < self.vocab_size:
        keep.append(i)
    return self._tok.decode(keep, skip_special_tokens=True)


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HuggingFaceTokenizer | RwkvWorldTokenizer


def _resolve_path(spec: str) -> str:
  """A directory stands for the tokenizer.json (or tokenizer.model) inside it."""
  if os.path.isdir(spec):
    for name in ("tokenizer.json", "tokenizer.model"):
      if os.path.isfile(os.path.join(spec, name)):
        return os.path.join(spec, name)
    raise FileNotFoundError(f"config.data.tokenizer={spec!r} is a directory without "
                            "tokenizer.json or tokenizer.model.")
  if not os.path.isfile(spec):
    raise FileNotFoundError(
        f"config.data.tokenizer={spec!r} is neither 'byte', 'rwkv_world' nor an existing "
        "SentencePiece .model file, tokenizer.json, RWKV World vocabulary .txt, or directory "
        "holding a tokenizer.json or tokenizer.model.")
  return spec


def get_tokenizer(spec: str) -> Tokenizer:
  """config.data.tokenizer: 'byte'; 'rwkv_world' (the RWKV World vocabulary of an
  installed `rwkv` package) or the path of such a vocabulary .txt; or a local
  SentencePiece .model file, a Hugging Face tokenizer.json, or a directory holding
  one (a downloaded model's directory)."""
  if spec == "byte":
    return ByteTokenizer()
  if spec == "rwkv_world":
    return RwkvWorldTokenizer(find_vocab_file())
  if spec.endswith(".txt") and not os.path.isfile(spec):
    raise FileNotFoundError(f"config.data.tokenizer={spec!r}: no such RWKV World vocabulary file "
                            f"({rwkv_world.WHERE}).")
  path = _resolve_path(spec)
  if path.endswith(".txt"):
    return RwkvWorldTokenizer(path)
  if path.endswith(".json"):
    try:
      return HuggingFaceTokenizer(path)
    except Exception as e:  # tokenizers raises its own Exception subclass.
      if isinstance(e, ValueError) and "config.data.tokenizer" in str(e):
        raise
      raise ValueError(f"config.data.tokenizer={spec!r} is not a readable tokenizer.json: "
                       f"{e}") from e
  try:
    return SentencePieceTokenizer(path)
  except (OSError, RuntimeError) as e:
    raise ValueError(f"config.data.tokenizer={spec!r} is not a readable "
                     f"SentencePiece model: {e}") from e
