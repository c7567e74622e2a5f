"""Image data configs for tests: the `config.data` keys the image pipeline reads."""

import ml_collections

SHAPES_TINY = "treadle_shapes/tiny"


def image_data_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """A config.data for train/data/images/pipeline.py (tiny shapes by default)."""
  data = ml_collections.ConfigDict(dict(
      name=SHAPES_TINY, data_dir=data_dir, train_split="train", eval_split="validation",
      image_key="image", label_key="label", image_size=32, random_flip=False,
      global_batch_size=16, worker_count=0))
  data.update(overrides)
  return data
