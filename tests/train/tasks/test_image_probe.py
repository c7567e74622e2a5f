"""The classifier probe: high on held-out shapes, about chance on noise."""

import numpy as np
import pytest

from helpers.images import image_data_config
from train.data import builder
from train.data.images import pipeline
from train.data.images import shapes
from train.tasks.diffusion import probe


def _split(data_dir, split, size):
  """The whole split as one batch: (images [size, 32, 32, 3], labels [size])."""
  config = image_data_config(data_dir, eval_split=split, global_batch_size=size)
  batch, = pipeline.make_eval_batches(config, num_batches=1, process_index=0, process_count=1)
  return batch["images"], batch["labels"]


def test_probe_tells_shapes_apart_and_not_noise(tmp_path):
  data_dir = builder.ensure_dataset("treadle_shapes/tiny", str(tmp_path))
  train_images, train_labels = _split(data_dir, "train", 512)
  held_out_images, held_out_labels = _split(data_dir, "validation", 128)
  fitted = probe.fit_probe(train_images, train_labels, num_classes=shapes.NUM_CLASSES,
                           seed=0, steps=300)
  assert fitted.accuracy(held_out_images, held_out_labels) > 0.9
  noise = np.random.default_rng(0).normal(size=held_out_images.shape).clip(-1, 1)
  assert fitted.accuracy(noise, held_out_labels) < 0.5
  predictions = fitted.predict(held_out_images[:5])
  assert predictions.shape == (5,) and predictions.dtype == np.int32


def test_bad_inputs_are_errors():
  images = np.zeros((4, 16, 16, 1), np.float32)
  with pytest.raises(ValueError, match="num_classes=2"):
    probe.fit_probe(images, np.array([0, 1, 2, 0]), num_classes=2, seed=0, steps=1)
  with pytest.raises(ValueError, match=r"labels \[b\]"):
    probe.fit_probe(images, np.array([0, 1]), num_classes=2, seed=0, steps=1)
