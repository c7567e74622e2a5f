"""Image data for the diffusion family: an embedded dataset, its pipeline, grids.

  shapes.py    `shape_example(split, index)`: procedural shapes, 8 classes
  builder.py   the `treadle_shapes` TFDS builder (array_record, no TensorFlow)
  pipeline.py  grain batches of any TFDS image dataset: `dataset_info`,
               `make_train_iterator`, `make_eval_batches`
  grid.py      `image_grid` and `write_png`, for looking at samples

Import the modules themselves (`from train.data.images import pipeline`):
train/data/builder.py imports builder.py to build `treadle_shapes` on first
use, and pipeline.py imports train/data/builder.py, so this file imports
nothing to keep that cycle out.
"""
