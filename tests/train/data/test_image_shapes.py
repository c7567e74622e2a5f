"""Procedural shapes: deterministic, balanced, visible, flip-invariant labels."""

import numpy as np
import pytest

from train.data.images import shapes


def test_examples_are_a_function_of_split_and_index():
  image, label = shapes.shape_example("train", 11)
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  assert label == 11 % shapes.NUM_CLASSES
  again, _ = shapes.shape_example("train", 11)
  np.testing.assert_array_equal(image, again)
  assert not np.array_equal(image, shapes.shape_example("validation", 11)[0])
  assert not np.array_equal(image, shapes.shape_example("train", 11 + shapes.NUM_CLASSES)[0])
  assert shapes.shape_example("train", 3, image_size=48)[0].shape == (48, 48, 3)


def test_every_split_is_balanced():
  labels = [shapes.shape_example("validation", i)[1] for i in range(4 * shapes.NUM_CLASSES)]
  assert np.bincount(labels).tolist() == [4] * shapes.NUM_CLASSES
  assert len(shapes.CLASS_NAMES) == len(set(shapes.CLASS_NAMES)) == 8


def test_a_bright_shape_lies_inside_a_dark_border():
  for i in range(64):
    image, _ = shapes.shape_example("train", i)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    assert border.max() < 130, i  # The background alone: shapes keep off the edge.
    assert image.max() > 170, i  # The shape's colour (every palette entry has a channel >= 200).
    assert (image.max(axis=-1) > 150).mean() > 0.02, i  # Covers more than a few pixels.


@pytest.mark.parametrize("kind", range(shapes.NUM_CLASSES))
def test_every_kind_is_left_right_symmetric(kind):
  """So random horizontal flips in training keep the label."""
  dy, dx = np.meshgrid(np.linspace(-9, 9, 37), np.linspace(-9, 9, 37), indexing="ij")
  distance = shapes._signed_distance(kind, dy, dx, 7.0)
  np.testing.assert_allclose(distance, shapes._signed_distance(kind, dy, -dx, 7.0), atol=1e-5)
  assert (distance < 0).any() and (distance > 0).any()


def test_kinds_differ_at_the_same_place_and_size():
  dy, dx = np.meshgrid(np.arange(-10.5, 11), np.arange(-10.5, 11), indexing="ij")
  masks = [shapes._signed_distance(k, dy, dx, 9.0) < 0 for k in range(shapes.NUM_CLASSES)]
  for a in range(len(masks)):
    for b in range(a):
      iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
      assert iou < 0.85, (shapes.CLASS_NAMES[a], shapes.CLASS_NAMES[b], iou)


def test_too_small_or_negative_is_an_error():
  with pytest.raises(ValueError, match="image_size=8"):
    shapes.shape_example("train", 0, image_size=8)
  with pytest.raises(ValueError, match="index=-1"):
    shapes.shape_example("train", -1)
