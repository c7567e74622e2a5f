"""grain input pipeline: per-host, checkpointable batches of packed rows.

Legend: b = global_batch_size // process_count rows per host, t seq_len.

Every batch is a dict of numpy arrays (see `packing.layout`):
  inputs, targets, segment_ids, positions: int32[b, t]
  loss_mask: float32[b, t]

Any TFDS dataset prepared as array_record goes through the same code: the
embedded `treadle_corpus` (built on first use) or e.g. `lm1b` with
`config.data.text_key='text'`. Each process reads only its own slice of the
split (records process_index, process_index + process_count, ...).
With data.worker_count > 0, grain worker processes are spawned: the main
module must be import-safe (`if __name__ == '__main__':`, as with absl's app.run).

  it = make_train_iterator(config.data, seed=config.seed,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
  batch = next(it)
  # Checkpoint with grain.checkpoint.CheckpointSave(it) in an ocp.args.Composite.
"""

import itertools

import grain
import ml_collections
import numpy as np

from train.data import packing
from train.data import sources
from train.data import tokenizers

Batch = dict[str, np.ndarray]

def _host_source(data_config: ml_collections.ConfigDict, split: str, split_field: str,
                 process_index: int, process_count: int) -> grain.MapDataset:
  """This host's records of `split`, as a grain MapDataset (with data.text_key checked)."""
  records, features = sources.host_records(data_config, split, split_field, process_index,
                                           process_count)
  if data_config.text_key not in features:
    raise KeyError(f"config.data.text_key={data_config.text_key!r} is not a feature "
                   f"of config.data.name={data_config.name!r}; it has {list(features)}.")
  return records


def _batches(ds: grain.MapDataset, data_config: ml_collections.ConfigDict, *,
             batch_size: int, seed: int, shuffle_rows: bool) -> grain.IterDataset:
  tokenizer = tokenizers.get_tokenizer(data_config.tokenizer)
  ds = ds.map(packing.Tokenize(tokenizer, data_config.text_key))
  return packing.pack_and_batch(
      ds.to_iter_dataset(sources.READ_OPTIONS), seq_len=data_config.seq_len,
      batch_size=batch_size, pad_id=tokenizer.pad_id, seed=seed,
      shuffle_rows=shuffle_rows)


def make_train_iterator(data_config: ml_collections.ConfigDict, *, seed: int,
                        process_index: int, process_count: int) -> grain.DatasetIterator:
  """Endless shuffled batches of data.train_split for this host.

  Args:
    data_config: config.data.
    seed: config.seed; orders records (reshuffled every epoch) and rows.
    process_index, process_count: this host and the number of hosts.
  Returns:
    A grain DatasetIterator of `Batch`es of b rows, with get_state/set_state:
    after set_state(s) it yields exactly what it yielded after get_state() == s.
  """
  batch_size = sources.per_host_batch_size(data_config, process_count)
  seed = seed % 2**32
  ds = _host_source(data_config, data_config.train_split, "train_split",
                    process_index, process_count)
  ds = ds.shuffle(seed=seed).repeat()
  ds = _batches(ds, data_config, batch_size=batch_size, seed=seed, shuffle_rows=True)
  return sources.prefetched(ds, data_config.worker_count)


def make_eval_batches(data_config: ml_collections.ConfigDict, *, num_batches: int,
                      process_index: int, process_count: int) -> list[Batch]:
  """The first `num_batches` batches of data.eval_split for this host, in order.

  Deterministic (no shuffling); wraps around the split if it is too short.
  """
  batch_size = sources.per_host_batch_size(data_config, process_count)
  ds = _host_source(data_config, data_config.eval_split, "eval_split",
                    process_index, process_count)
  ds = _batches(ds.repeat(), data_config, batch_size=batch_size, seed=0,
                shuffle_rows=False)
  return list(itertools.islice(iter(ds), num_batches))
