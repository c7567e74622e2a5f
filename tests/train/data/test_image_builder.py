"""treadle_shapes as a TFDS dataset: built on first use, read back without TensorFlow."""

import os
import sys

import numpy as np
import tensorflow_datasets as tfds

from train.data import builder
from train.data.images import builder as images_builder
from train.data.images import shapes

TINY = "treadle_shapes/tiny"


def test_ensure_dataset_builds_tiny_shapes_and_reads_them_back(tmp_path):
  data_dir = builder.ensure_dataset(TINY, str(tmp_path))
  version_dir = tmp_path / "treadle_shapes" / "tiny" / str(images_builder.TreadleShapes.VERSION)
  assert data_dir == str(tmp_path) and os.path.isdir(version_dir)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".treadle_build")]
  info = tfds.builder(TINY, data_dir=data_dir).info
  assert info.file_format.value == "array_record"
  assert info.features["label"].names == list(shapes.CLASS_NAMES)
  assert info.features["image"].shape == (32, 32, 3)
  sizes = {}
  for split in ("train", "validation"):
    source = tfds.data_source(TINY, split=split, data_dir=data_dir, download=False)
    sizes[split] = len(source)
    # Records are stored shuffled; every index appears once, pixels exact (PNG).
    expected = {shapes.shape_example(split, i)[0].tobytes(): shapes.shape_example(split, i)[1]
                for i in range(len(source))}
    got = {}
    for i in range(len(source)):
      example = source[i]
      assert example["image"].dtype == np.uint8 and example["image"].shape == (32, 32, 3)
      got[example["image"].tobytes()] = int(example["label"])
    assert got == expected
  assert sizes == {"train": 512, "validation": 128}
  assert "tensorflow" not in sys.modules
  # A second call reuses the prepared data.
  mtime = os.path.getmtime(version_dir)
  assert builder.ensure_dataset(TINY, str(tmp_path)) == data_dir
  assert os.path.getmtime(version_dir) == mtime


def test_default_config_sizes():
  configs = {c.name: c for c in images_builder.TreadleShapes.BUILDER_CONFIGS}
  assert (configs["default"].num_train, configs["default"].num_validation) == (20_000, 1_000)
  assert images_builder.TreadleShapes.VERSION >= tfds.core.Version("1.0.0")


def test_png_encoding_is_lossless():
  image, _ = shapes.shape_example("train", 5)
  feature = tfds.features.Image(shape=(32, 32, 3), encoding_format="png")
  decoded = feature.decode_example_np(images_builder.encode_png(image))
  np.testing.assert_array_equal(decoded, image)
