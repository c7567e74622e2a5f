"""Documents -> packed rows: tokenize, shift, chunk, first-fit pack, lay out.

Legend: b rows per host batch, t seq_len.

Each document becomes [bos] + tokens + [eos]; inputs = doc[:-1] and targets =
doc[1:] are cut BEFORE packing, so no target crosses a document boundary.
Documents longer than t are cut into chunks of at most t, and chunks are packed
into rows by grain's first-fit packer. A row holds segments 1, 2, 3, ...,
positions restart at 0 in every segment, and padding has segment id 0,
loss_mask 0 and token pad_id.
"""

from typing import Any

import grain
import numpy as np

from train.data import tokenizers

# First-fit packs into this many open rows at a time (at least one batch):
# more rows leave less padding.
MIN_PACKING_BINS = 64


class Tokenize(grain.transforms.Map):
  """{text_key: bytes|str} -> {'inputs': int32[n], 'targets': int32[n]}."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, text_key: str):
    self._tokenizer = tokenizer
    self._text_key = text_key

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    text = element[self._text_key]
    if isinstance(text, np.ndarray):
      text = text.item()
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    tok = self._tokenizer
    doc = np.asarray([tok.bos_id] + tok.encode(text) + [tok.eos_id], np.int32)
    return {"inputs": doc[:-1], "targets": doc[1:]}


class Chunk(grain.experimental.FlatMapTransform):
  """Cuts a shifted document into pieces of at most `seq_len` tokens."""

  max_fan_out = 1 << 16

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n, t = len(element["inputs"]), self._seq_len
    return [{k: v[i:i + t] for k, v in element.items()} for i in range(0, n, t)]


def layout(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's packed batch -> the trainer's batch.

  Returns:
    inputs, targets, segment_ids, positions: int32[b, t];
    loss_mask: float32[b, t], 1 where targets holds a real next token.
  """
  return {
      "inputs": packed["inputs"].astype(np.int32),
      "targets": packed["targets"].astype(np.int32),
      "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
      "positions": packed["inputs_positions"].astype(np.int32),
      "loss_mask": (packed["targets_segment_ids"] > 0).astype(np.float32),
  }


def pack_and_batch(ds: grain.IterDataset, *, seq_len: int, batch_size: int,
                   pad_id: int, seed: int, shuffle_rows: bool) -> grain.IterDataset:
  """Tokenized documents -> batches of packed rows (see `layout`).

  Args:
    ds: elements from `Tokenize`.
    seq_len: t. batch_size: b.
    pad_id: token written into padding.
    seed: shuffles rows within each packing round when `shuffle_rows`.
  """
  ds = grain.experimental.FlatMapIterDataset(ds, Chunk(seq_len))
  ds = grain.experimental.FirstFitPackIterDataset(
      ds,
      length_struct={"inputs": seq_len, "targets": seq_len},
      num_packing_bins=max(batch_size, MIN_PACKING_BINS),
      seed=seed,
      shuffle_bins=shuffle_rows,
      padding_struct={"inputs": pad_id, "targets": pad_id},
  )
  return ds.batch(batch_size, drop_remainder=True).map(layout)
