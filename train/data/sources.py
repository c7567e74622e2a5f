"""What every grain input pipeline here shares: the per-host batch size, this host's
records of a TFDS split, and prefetching whole batches.

The text (train/data/pipeline.py) and image (train/data/images/pipeline.py)
pipelines differ only in how a record becomes a batch row.
"""

from absl import flags
import grain
import ml_collections
import tensorflow_datasets as tfds

from train.data import builder

# Records are read in the batching thread: on few cores, grain's read threads
# cost more in locking than they save. Whole batches are prefetched instead.
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
# Batches prepared ahead in a background thread while the train step runs.
PREFETCH_BATCHES = 2


def per_host_batch_size(data_config: ml_collections.ConfigDict,
                        process_count: int) -> int:
  """global_batch_size // process_count; raises unless it divides evenly."""
  global_batch = data_config.global_batch_size
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(
        f"config.data.global_batch_size={global_batch} must be a positive "
        f"multiple of the number of processes ({process_count}).")
  return global_batch // process_count


def host_records(data_config: ml_collections.ConfigDict, split: str, split_field: str,
                 process_index: int, process_count: int
                 ) -> tuple[grain.MapDataset, tfds.features.FeaturesDict]:
  """This host's records of `split` (records process_index, process_index +
  process_count, ...) as a grain MapDataset, and the dataset's features.

  The dataset is built first if it is embedded; errors name `config.data.name`
  and `config.data.<split_field>`.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  data_dir = builder.ensure_dataset(data_config.name, data_config.data_dir)
  try:
    source = tfds.data_source(data_config.name, split=split, data_dir=data_dir,
                              download=False)
  except ValueError as e:
    raise ValueError(f"config.data.{split_field}={split!r} is not a split of "
                     f"config.data.name={data_config.name!r}: {e}") from e
  if len(source) < process_count:
    raise ValueError(f"config.data.{split_field}={split!r} of config.data.name="
                     f"{data_config.name!r} has {len(source)} records, fewer "
                     f"than the {process_count} processes reading it.")
  records = grain.MapDataset.source(source)[process_index::process_count]
  return records, source.dataset_info.features


def prefetched(ds: grain.IterDataset, worker_count: int) -> grain.DatasetIterator:
  """Iterates `ds` with batches prepared ahead: in `worker_count` grain worker
  processes, or (0) in one background thread.

  With workers, the main module must be import-safe (`if __name__ ==
  '__main__':`, as with absl's app.run).
  """
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; notebooks never parse them.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  else:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=PREFETCH_BATCHES)
  return iter(ds)
