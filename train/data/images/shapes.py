"""Procedural images of simple shapes: the embedded image dataset's content.

Each example is one bright shape on a dark background, a pure function of
(split, index):

  image, label = shape_example("train", 7)   # uint8 [32, 32, 3], int in [0, 8)

The shape's kind is the label (`CLASS_NAMES[label]`); its colour (from
`PALETTE`), centre and size are random, and so is the background (a dark
colour with a soft linear gradient), so a classifier has to look at the
outline, not the colour. Every kind is left-right symmetric: a horizontal flip
keeps the label. Shapes are drawn from signed distance functions with one
pixel of anti-aliasing, so edges look alike at every size.

Legend: H, W image height and width (both `image_size`).
"""

import functools
import zlib

import numpy as np

CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring",
               "horizontal_bar", "vertical_bar", "diamond")
NUM_CLASSES = len(CLASS_NAMES)

# Bright shape colours (RGB); a small jitter is added per example.
PALETTE = np.array([
    (230, 60, 50), (60, 200, 80), (70, 110, 240), (240, 220, 60),
    (60, 220, 230), (220, 70, 220), (250, 150, 40), (235, 235, 235),
], dtype=np.float32)

# The smallest image the shapes stay recognisable in (a ring needs a hole).
MIN_IMAGE_SIZE = 16


@functools.lru_cache(maxsize=8)
def _pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(y, x) pixel-centre coordinates, each float32 [H, W]."""
  coords = np.arange(image_size, dtype=np.float32) + 0.5
  y, x = np.meshgrid(coords, coords, indexing="ij")
  y.flags.writeable = x.flags.writeable = False
  return y, x


def _signed_distance(kind: int, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
  """Approximate distance in pixels to the outline of shape `kind`, < 0 inside.

  dy, dx: float32 [H, W] offsets from the shape's centre (y points down);
  r: the shape's half-extent in pixels.
  """
  ax, ay = np.abs(dx), np.abs(dy)
  name = CLASS_NAMES[kind]
  if name == "circle":
    return np.hypot(dx, dy) - r
  if name == "square":
    return np.maximum(ax, ay) - 0.85 * r
  if name == "triangle":  # Apex up at -r, base at +0.8 r, half-width r at the base.
    slope = np.float32(1.8)
    side = (slope * ax - (dy + r)) / np.sqrt(1 + slope * slope)
    return np.maximum(dy - 0.8 * r, side)
  if name == "cross":
    arm = 0.3 * r
    return np.minimum(np.maximum(ax - r, ay - arm), np.maximum(ax - arm, ay - r))
  if name == "ring":
    return np.abs(np.hypot(dx, dy) - 0.75 * r) - 0.25 * r
  if name == "horizontal_bar":
    return np.maximum(ax - r, ay - 0.3 * r)
  if name == "vertical_bar":
    return np.maximum(ax - 0.3 * r, ay - r)
  if name == "diamond":
    return (ax + ay - r) / np.sqrt(np.float32(2))
  raise AssertionError(name)


def _rng(split: str, index: int) -> np.random.Generator:
  """A generator seeded by (split, index) alone: stable across runs and hosts."""
  return np.random.default_rng([zlib.crc32(split.encode()), index])


def shape_example(split: str, index: int, image_size: int = 32) -> tuple[np.ndarray, int]:
  """Example `index` of `split`: (uint8 [H, W, 3] image, label).

  Labels cycle through the classes (index % NUM_CLASSES), so every split is
  balanced; everything else is drawn from a generator seeded by (split, index).
  """
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"image_size={image_size} is below {MIN_IMAGE_SIZE}, too small "
                     f"for the shapes to stay recognisable.")
  if index < 0:
    raise ValueError(f"index={index} must be >= 0.")
  label = index % NUM_CLASSES
  rng = _rng(split, index)
  y, x = _pixel_grid(image_size)
  s = np.float32(image_size)

  # Background: dark base colour plus a soft gradient in a random direction.
  base = rng.uniform(0, 50, size=3).astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(angle) * x + np.sin(angle) * y) / s  # In about [-1.4, 1.4].
  amplitude = rng.uniform(0, 25, size=3).astype(np.float32)
  background = base + (ramp[..., None] + 1.5) * amplitude

  # The shape: half-extent r between 18% and 38% of the image, fully inside.
  r = np.float32(rng.uniform(0.18, 0.38) * s)
  cy, cx = rng.uniform(r + 1, s - r - 1, size=2).astype(np.float32)
  colour = PALETTE[rng.integers(len(PALETTE))] + rng.uniform(-20, 20, size=3)
  colour = np.clip(colour, 0, 255).astype(np.float32)
  alpha = np.clip(0.5 - _signed_distance(label, y - cy, x - cx, r), 0, 1)[..., None]

  image = alpha * colour + (1 - alpha) * background
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), label
