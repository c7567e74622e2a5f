"""grain pipeline: packing invariants, exact resume (orbax too), hosts, errors."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from etils import epath

from configs import base
from models.llama import LlamaConfig
from helpers.batches import assert_same_batches, take
from train.data import builder
from train.data import pipeline
from train.data import tokenizers

TOK = tokenizers.ByteTokenizer()


class TreadleTestLines(tfds.core.GeneratorBasedBuilder):
  """A stand-in for a real text dataset: another name, text key and splits."""

  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("0.1.0")

  def _info(self):
    features = {"sentence": tfds.features.Text(), "label": tfds.features.Scalar(np.int64)}
    return tfds.core.DatasetInfo(builder=self,
                                 features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split, n) for split, n in (("train", 40), ("test", 10))}

  def _generate_examples(self, split, n):
    for i in range(n):
      yield i, {"sentence": f"{split} line {i} " + "xyz" * (i % 7), "label": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return builder.ensure_dataset("treadle_corpus/tiny", str(tmp_path_factory.mktemp("tfds")))


def _config(data_dir, **overrides):
  data = base.get_base_config(LlamaConfig()).data
  data.update(dict(name="treadle_corpus/tiny", data_dir=data_dir, seq_len=32,
                   global_batch_size=4))
  data.update(overrides)
  return data


def _segments(batch):
  """(inputs, targets, positions) of every segment of every row."""
  for row in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][row]
    for s in np.unique(seg[seg > 0]):
      where = seg == s
      yield (batch["inputs"][row][where], batch["targets"][row][where],
             batch["positions"][row][where])


def _documents(data_dir, split="train", name="treadle_corpus/tiny", key="text"):
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  return [source[i][key].decode() for i in range(len(source))]


def test_batch_layout_and_packing_invariants(data_dir):
  config = _config(data_dir, seq_len=24)  # Shorter than many documents.
  it = pipeline.make_train_iterator(config, seed=0, process_index=0, process_count=1)
  docs = _documents(data_dir)
  chunks_not_at_start = 0
  for batch in take(it, 8):
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for k, v in batch.items():
      assert v.shape == (4, 24)
      assert v.dtype == (np.float32 if k == "loss_mask" else np.int32)
    pad = batch["segment_ids"] == 0
    np.testing.assert_array_equal(batch["loss_mask"], (~pad).astype(np.float32))
    assert (batch["inputs"][pad] == TOK.pad_id).all()
    assert (batch["targets"][pad] == TOK.pad_id).all()
    for seg in batch["segment_ids"]:  # Segments 1, 2, ... then padding.
      used = seg[seg > 0]
      assert (np.diff(seg[: len(used)]) >= 0).all() and used[0] == 1
      assert set(used) == set(range(1, used.max() + 1))
      assert (seg[len(used):] == 0).all()
    assert (batch["loss_mask"].mean() > 0.5)
    for inputs, targets, positions in _segments(batch):
      np.testing.assert_array_equal(positions, np.arange(len(inputs)))
      np.testing.assert_array_equal(targets[:-1], inputs[1:])  # The shift.
      # bos only opens a document, eos only closes one: no target crosses.
      assert TOK.bos_id not in inputs[1:] and TOK.bos_id not in targets
      assert TOK.eos_id not in inputs and TOK.eos_id not in targets[:-1]
      text = TOK.decode(np.append(inputs, targets[-1]))
      starts, ends = inputs[0] == TOK.bos_id, targets[-1] == TOK.eos_id
      chunks_not_at_start += not starts
      assert any(text in d and (not starts or d.startswith(text))
                 and (not ends or d.endswith(text)) for d in docs)
  assert chunks_not_at_start > 0  # Long documents were cut into chunks.


def test_resume_from_state_is_exact(data_dir):
  config = _config(data_dir)
  it = pipeline.make_train_iterator(config, seed=3, process_index=0, process_count=1)
  first = take(it, 5)
  state = it.get_state()
  expected = take(it, 60)  # > one epoch of the tiny split: crosses a reshuffle.
  again = pipeline.make_train_iterator(config, seed=3, process_index=0, process_count=1)
  assert_same_batches(take(again, 5), first)
  resumed = pipeline.make_train_iterator(config, seed=3, process_index=0, process_count=1)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 60), expected)
  other = pipeline.make_train_iterator(config, seed=4, process_index=0, process_count=1)
  assert not np.array_equal(next(other)["inputs"], first[0]["inputs"])


def test_worker_processes_yield_the_same_batches(data_dir):
  config = _config(data_dir)
  expected = take(pipeline.make_train_iterator(
      config, seed=0, process_index=0, process_count=1), 6)
  config.worker_count = 1
  it = pipeline.make_train_iterator(config, seed=0, process_index=0, process_count=1)
  assert_same_batches(take(it, 3), expected[:3])
  state = it.get_state()
  it.close()
  resumed = pipeline.make_train_iterator(config, seed=0, process_index=0, process_count=1)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 3), expected[3:])
  resumed.close()


def test_orbax_checkpoint_round_trip(data_dir, tmp_path):
  config = _config(data_dir)
  it = pipeline.make_train_iterator(config, seed=0, process_index=0, process_count=1)
  take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = take(it, 4)
  fresh = pipeline.make_train_iterator(config, seed=0, process_index=0, process_count=1)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    assert manager.latest_step() == 7
    restored = manager.restore(
        7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_same_batches(take(restored.data, 4), expected)


def test_hosts_read_disjoint_slices(data_dir):
  config = _config(data_dir, seq_len=128)  # Whole documents fit in a row.
  docs = _documents(data_dir)
  seen = []
  for index in range(2):
    it = pipeline.make_train_iterator(config, seed=0, process_index=index, process_count=2)
    batches = take(it, 10)
    assert batches[0]["inputs"].shape == (2, 128)
    whole = {TOK.decode(np.append(i, t[-1])) for b in batches for i, t, _ in _segments(b)
             if i[0] == TOK.bos_id and t[-1] == TOK.eos_id}
    assert whole and whole <= set(docs[index::2])
    seen.append(whole)
  assert not seen[0] & seen[1]


def test_eval_batches_are_deterministic(data_dir):
  config = _config(data_dir)
  a = pipeline.make_eval_batches(config, num_batches=3, process_index=0, process_count=1)
  b = pipeline.make_eval_batches(config, num_batches=3, process_index=0, process_count=1)
  assert len(a) == 3
  assert_same_batches(a, b)
  assert a[0]["inputs"].shape == (4, 32) and a[0]["loss_mask"].dtype == np.float32
  host1 = pipeline.make_eval_batches(config, num_batches=1, process_index=1, process_count=2)
  assert host1[0]["inputs"].shape == (2, 32)
  assert not np.array_equal(host1[0]["inputs"], a[0]["inputs"][:2])
  val = _documents(data_dir, split="validation")
  assert TOK.decode(a[0]["inputs"][0][1:]).startswith(val[0][:8])


def test_any_tfds_text_dataset_by_name(tmp_path):
  TreadleTestLines(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = _config(str(tmp_path), name="treadle_test_lines", text_key="sentence",
                   eval_split="test", seq_len=16)
  lines = _documents(str(tmp_path), name="treadle_test_lines", key="sentence")
  it = pipeline.make_train_iterator(config, seed=0, process_index=0, process_count=1)
  pieces = [TOK.decode(np.append(i, t[-1]))
            for b in take(it, 5) for i, t, _ in _segments(b)]
  assert pieces and all(any(p in line for line in lines) for p in pieces)
  batch = pipeline.make_eval_batches(config, num_batches=1, process_index=0, process_count=1)[0]
  first = _documents(str(tmp_path), "test", name="treadle_test_lines", key="sentence")[0]
  assert first.startswith("test line") and TOK.decode(
      batch["inputs"][0][batch["segment_ids"][0] == 1]) == first[:15]


def test_errors_name_the_field(data_dir, tmp_path):
  make = lambda config, count=1: pipeline.make_train_iterator(
      config, seed=0, process_index=0, process_count=count)
  with pytest.raises(ValueError, match="data.global_batch_size"):
    make(_config(data_dir, global_batch_size=5), count=2)
  with pytest.raises(FileNotFoundError, match="config.data.name='lm1b'"):
    make(_config(str(tmp_path), name="lm1b"))
  with pytest.raises(KeyError, match="data.text_key"):
    make(_config(data_dir, text_key="sentence"))
  with pytest.raises(ValueError, match="data.train_split"):
    make(_config(data_dir, train_split="trian"))
  with pytest.raises(FileNotFoundError, match="config.data.tokenizer"):
    make(_config(data_dir, tokenizer=str(tmp_path / "nope.model")))
