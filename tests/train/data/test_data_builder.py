"""treadle_corpus as a TFDS dataset: build, read without TensorFlow, errors."""

import os
import sys

import pytest
import tensorflow_datasets as tfds

from train.data import builder
from train.data import corpus

TINY = "treadle_corpus/tiny"


def test_build_and_read_through_data_source(tmp_path):
  data_dir = builder.ensure_dataset(TINY, str(tmp_path))
  assert data_dir == str(tmp_path)
  assert os.path.isdir(tmp_path / "treadle_corpus" / "tiny" / str(builder.TreadleCorpus.VERSION))
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".treadle_build")]
  info = tfds.builder(TINY, data_dir=data_dir).info
  assert info.file_format.value == "array_record"
  train = tfds.data_source(TINY, split="train", data_dir=data_dir, download=False)
  val = tfds.data_source(TINY, split="validation", data_dir=data_dir, download=False)
  assert (len(train), len(val)) == (256, 64)
  texts = {train[i]["text"].decode() for i in range(len(train))}
  assert texts == {corpus.document("train", i) for i in range(256)}
  assert "tensorflow" not in sys.modules
  # Second call reuses the prepared data.
  mtime = os.path.getmtime(tmp_path / "treadle_corpus" / "tiny" / str(builder.TreadleCorpus.VERSION))
  assert builder.ensure_dataset(TINY, str(tmp_path)) == data_dir
  assert os.path.getmtime(tmp_path / "treadle_corpus" / "tiny" / str(builder.TreadleCorpus.VERSION)) == mtime


def test_losing_a_concurrent_build_is_harmless(tmp_path):
  builder.ensure_dataset(TINY, str(tmp_path))
  # A second process that built too: its rename fails, the winner's data stays.
  builder._build_corpus(TINY, str(tmp_path))
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".treadle_build")]
  train = tfds.data_source(TINY, split="train", data_dir=str(tmp_path), download=False)
  assert len(train) == 256


def test_empty_data_dir_means_env_then_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("TREADLE_DATA_DIR", str(tmp_path / "env"))
  assert builder.resolve_data_dir("") == str(tmp_path / "env")
  assert builder.ensure_dataset(TINY, "") == str(tmp_path / "env")
  monkeypatch.delenv("TREADLE_DATA_DIR")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert builder.resolve_data_dir("") == str(tmp_path / "home/.cache/treadle/tfds")


@pytest.mark.parametrize("name", ["lm1b", "no_such_dataset_xyz"])
def test_missing_dataset_names_the_fields_and_the_fix(tmp_path, name):
  with pytest.raises(FileNotFoundError) as e:
    builder.ensure_dataset(name, str(tmp_path))
  for part in ("config.data.name", "config.data.data_dir", f"tfds build {name}",
               str(tmp_path)):
    assert part in str(e.value)
