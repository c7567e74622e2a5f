"""Tokenizers: UTF-8 bytes (the default) or a SentencePiece model.

Both expose the same small interface: `encode(text) -> list[int]` without
special tokens (the pipeline adds bos/eos), `decode(ids) -> str` that drops
special tokens and by default stops at the first eos, and the ids `pad_id`,
`bos_id`, `eos_id` and `vocab_size`.
"""

import os
from collections.abc import Iterable

import numpy as np
import sentencepiece


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


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def get_tokenizer(spec: str) -> Tokenizer:
  """'byte', or the path to a SentencePiece .model file (config.data.tokenizer)."""
  if spec == "byte":
    return ByteTokenizer()
  if not os.path.isfile(spec):
    raise FileNotFoundError(
        f"config.data.tokenizer={spec!r} is neither 'byte' nor an existing "
        "SentencePiece .model file.")
  try:
    return SentencePieceTokenizer(spec)
  except (OSError, RuntimeError) as e:
    raise ValueError(f"config.data.tokenizer={spec!r} is not a readable "
                     f"SentencePiece model: {e}") from e
