"""The RWKV World tokenizer: greedy longest match over a 65,530-entry byte vocabulary.

BlinkDL's World models (RWKV-5/6/7 World, G1) tokenize UTF-8 bytes by taking,
at each position, the longest vocabulary entry that the remaining bytes start
with; every single byte is an entry, so any text encodes. The vocabulary file
(`rwkv_vocab_v20230424.txt`) has one entry a line: `<id> <Python literal of a
str or bytes> <byte length>`, e.g. `261 '\\n\\n' 2` or `250 b'\\xf9' 1`. Id 0
is not in the file: it ends (and separates) documents.

The file ships with the `rwkv` pip package (`rwkv/rwkv_vocab_v20230424.txt`)
and in BlinkDL's ChatRWKV and RWKV-LM repositories; nothing is downloaded, and
the `rwkv` package is never imported (its folder is only looked up when
`data.tokenizer='rwkv_world'`).
"""

import ast
import functools
import importlib.util
import os
from collections.abc import Iterable

VOCAB_FILE = "rwkv_vocab_v20230424.txt"
WHERE = (f"{VOCAB_FILE} ships in the `rwkv` pip package's rwkv/ folder (pip install rwkv) and "
          "in github.com/BlinkDL/ChatRWKV (tokenizer/) and github.com/BlinkDL/RWKV-LM")


def find_vocab_file() -> str:
  """The vocabulary file of an installed `rwkv` package (located without importing it)."""
  spec = importlib.util.find_spec("rwkv")
  folders = [] if spec is None else list(spec.submodule_search_locations or [])
  for folder in folders:
    path = os.path.join(folder, VOCAB_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"config.data.tokenizer='rwkv_world' looks for {VOCAB_FILE} in the `rwkv` pip package, "
      f"which is not installed here; set config.data.tokenizer to the file's path instead "
      f"({WHERE}).")


def _parse_entry(line: str, path: str, number: int) -> tuple[int, bytes]:
  """'<id> <literal> <length>' -> (id, the entry's bytes)."""
  try:
    first, last = line.index(" "), line.rindex(" ")
    token_id, literal, length = int(line[:first]), line[first + 1:last], int(line[last + 1:])
    if "\\" not in literal and literal[:1] in "'\"" and literal[-1:] == literal[:1]:
      value = literal[1:-1]  # A plain quoted str: no escapes to undo (the common case).
    else:
      value = ast.literal_eval(literal)
    if isinstance(value, str):
      value = value.encode("utf-8")
    if not isinstance(value, bytes) or len(value) != length:
      raise ValueError(f"{literal} is not a str or bytes of {length} bytes")
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"config.data.tokenizer={path!r}: line {number} ({line.strip()!r}) is not "
                     f"'<id> <str or bytes literal> <byte length>' ({e}); point it at "
                     f"{VOCAB_FILE} ({WHERE}).") from e
  return token_id, value


@functools.lru_cache(maxsize=4)
def _read_vocab(path: str) -> tuple[dict[bytes, int], dict[int, bytes]]:
  """(prefix table, id -> bytes) of a vocabulary file.

  The prefix table maps every entry to its id and every proper prefix of an
  entry that is not itself an entry to -1, so a longest match extends a byte
  at a time while the bytes so far are in the table.
  """
  with open(path, encoding="utf-8") as f:
    pieces = {}
    for number, line in enumerate(f, 1):
      if line.strip():
        token_id, value = _parse_entry(line, path, number)
        pieces[token_id] = value
  if 0 in pieces:
    raise ValueError(f"config.data.tokenizer={path!r} has an entry with id 0, which the RWKV "
                     "World format keeps for the end of a document.")
  values = set(pieces.values())
  missing = [b for b in range(256) if bytes([b]) not in values]
  if missing:
    raise ValueError(f"config.data.tokenizer={path!r} lacks the single bytes {missing[:5]}..., "
                     "so some text could not be encoded.")
  table = {}
  for value in pieces.values():
    for end in range(1, len(value)):
      table.setdefault(value[:end], -1)
  for token_id, value in pieces.items():
    table[value] = token_id
  return table, pieces


class RwkvWorldTokenizer:
  """Greedy longest-match tokenizer over an RWKV World vocabulary file.

  Attributes:
    path: the vocabulary file.
    pad_id, bos_id, eos_id: 0 (the World models' document separator; padding is
      masked out of the loss).
    vocab_size: the largest id + 1 (65,530 for the World file; the published
      models have 65,536 embedding rows).
  """

  pad_id = 0
  bos_id = 0
  eos_id = 0

  def __init__(self, path: str):
    self.path = path
    self._table, self._pieces = _read_vocab(path)
    self._longest = max(len(v) for v in self._pieces.values())
    self.vocab_size = max(self._pieces) + 1

  def __getstate__(self):  # Workers reread (and cache) the file instead of unpickling 100k entries.
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def encode_bytes(self, data: bytes) -> list[int]:
    """Ids of the longest entries `data` starts with, left to right."""
    table, longest, out = self._table, self._longest, []
    start, n = 0, len(data)
    while start < n:
      best_end, best_id = start + 1, table[data[start:start + 1]]
      for end in range(start + 2, min(n, start + longest) + 1):
        found = table.get(data[start:end])
        if found is None:
          break
        if found >= 0:
          best_end, best_id = end, found
      out.append(best_id)
      start = best_end
    return out

  def encode(self, text: str) -> list[int]:
    return self.encode_bytes(text.encode("utf-8"))

  def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
    """The text of `ids`, dropping ids outside the vocabulary (and 0); bytes that do not
    form UTF-8 become U+FFFD."""
    out = bytearray()
    for i in ids:
      i = int(i)
      if i == self.eos_id and stop_at_eos:
        break
      out += self._pieces.get(i, b"")
    return out.decode("utf-8", errors="replace")
