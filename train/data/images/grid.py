"""Image grids and PNG files: how samples and batches are looked at.

Legend: b images, H, W, c image height, width and channels (3 RGB or 1 grey).

  grid = image_grid(samples, rows=4)          # float [-1, 1] -> uint8 RGB
  write_png(f"{workdir}/samples/step_{step}.png", grid)
"""

import io
import math
import os
import tempfile

import numpy as np
from PIL import Image
from etils import epath


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float values in [-1, 1] (clipped; NaN -> -1) -> uint8 in [0, 255]."""
  images = np.nan_to_num(np.asarray(images, np.float32), nan=-1.0)
  return np.rint((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)


def image_grid(images: np.ndarray, rows: int, pad: int = 2,
               pad_value: int = 128) -> np.ndarray:
  """Tiles images row by row into one RGB image.

  Args:
    images: float [b, H, W, c] in [-1, 1] (values outside are clipped), c 1 or 3.
    rows: grid rows; columns = ceil(b / rows), cells past b stay blank.
    pad: pixels between neighbouring images (half of it around the border).
    pad_value: grey level of the padding and blank cells.
  Returns:
    uint8 [rows·(H + pad), cols·(W + pad), 3]; grey images repeat on 3 channels.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [b, H, W, c] with c 1 or 3; got shape {images.shape}.")
  if rows < 1 or pad < 0:
    raise ValueError(f"rows={rows} must be >= 1 and pad={pad} >= 0.")
  b, height, width, _ = images.shape
  cols = max(1, math.ceil(b / rows))
  pixels = np.broadcast_to(to_uint8(images), (b, height, width, 3))
  before = pad // 2  # The rest of pad goes after the image.
  cells = np.full((rows * cols, height + pad, width + pad, 3), pad_value, np.uint8)
  cells[:b, before:before + height, before:before + width] = pixels
  grid = cells.reshape(rows, cols, height + pad, width + pad, 3).transpose(0, 2, 1, 3, 4)
  return grid.reshape(rows * (height + pad), cols * (width + pad), 3)


def write_png(path: str, image: np.ndarray) -> None:
  """Writes uint8 [H, W, 3] or [H, W] (or [H, W, 1]) to `path` as PNG.

  Local files are written to a temporary file beside `path`, then renamed,
  so a reader never sees half a file; other epath locations (gs://...) get
  one write. Parent directories are created.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
      image.ndim == 3 and image.shape[-1] not in (1, 3)):
    raise ValueError(f"write_png takes uint8 [H, W], [H, W, 1] or [H, W, 3]; got "
                     f"{image.dtype} {image.shape} (see image_grid / to_uint8).")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if "://" in os.fspath(path):
    target.write_bytes(buffer.getvalue())
    return
  fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(buffer.getvalue())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
