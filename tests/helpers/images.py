"""Image data configs for tests: the `config.data` keys the image pipeline reads."""

import ml_collections

from configs import base

SHAPES_TINY = "treadle_shapes/tiny"


def image_data_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """configs/base.py's image `config.data` on the tiny shapes, unflipped, 16 per batch."""
  data = base.image_data_section()
  data.update(dict(name=SHAPES_TINY, data_dir=data_dir, random_flip=False,
                   global_batch_size=16))
  data.update(overrides)
  return data
