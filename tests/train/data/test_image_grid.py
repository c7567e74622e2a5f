"""Image grids and PNG files."""

import os

import numpy as np
from PIL import Image
import pytest

from train.data.images import grid


def test_values_map_to_pixels_clipped():
  values = np.array([-1.0, 0.0, 1.0, -3.0, 2.0, np.nan, 0.5])
  np.testing.assert_array_equal(grid.to_uint8(values), [0, 128, 255, 0, 255, 0, 191])


def test_grid_layout_padding_and_blank_cells():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, size=(5, 4, 6, 3)).astype(np.float32)
  out = grid.image_grid(images, rows=2, pad=2, pad_value=77)
  assert out.shape == (2 * 6, 3 * 8, 3) and out.dtype == np.uint8
  for i in range(5):
    row, col = divmod(i, 3)
    cell = out[row * 6:(row + 1) * 6, col * 8:(col + 1) * 8]
    np.testing.assert_array_equal(cell[1:5, 1:7], grid.to_uint8(images[i]))
    assert (cell[[0, 5]] == 77).all() and (cell[:, [0, 7]] == 77).all()
  assert (out[6:, 16:] == 77).all()  # The sixth cell is blank.


def test_grey_images_repeat_on_three_channels_and_pad_zero():
  images = np.linspace(-1, 1, 2 * 3 * 3).reshape(2, 3, 3, 1)
  out = grid.image_grid(images, rows=1, pad=0)
  assert out.shape == (3, 6, 3)
  np.testing.assert_array_equal(out[:, :3, 0], grid.to_uint8(images[0, ..., 0]))
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_bad_grids_are_errors():
  with pytest.raises(ValueError, match="b, H, W, c"):
    grid.image_grid(np.zeros((2, 4, 4, 2)), rows=1)
  with pytest.raises(ValueError, match="rows=0"):
    grid.image_grid(np.zeros((2, 4, 4, 3)), rows=0)


def test_write_png_round_trips_and_leaves_no_temp_files(tmp_path):
  image = np.random.default_rng(1).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
  path = tmp_path / "samples" / "step_10.png"  # The folder does not exist yet.
  grid.write_png(str(path), image)
  grid.write_png(str(path), image[::-1])  # Replaces the file.
  with Image.open(path) as png:
    np.testing.assert_array_equal(np.asarray(png), image[::-1])
  assert os.listdir(tmp_path / "samples") == ["step_10.png"]
  grid.write_png(str(tmp_path / "grey.png"), image[..., :1])
  with Image.open(tmp_path / "grey.png") as png:
    np.testing.assert_array_equal(np.asarray(png), image[..., 0])
  with pytest.raises(ValueError, match="uint8"):
    grid.write_png(str(tmp_path / "bad.png"), image.astype(np.float32))
